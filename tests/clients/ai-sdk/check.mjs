// The Vercel AI SDK against an appliance: its openai-compatible provider (chat completions) and
// its default OpenAI provider (the Responses API). Prints one JSON object of what came back;
// tests/test_clients.py asserts on it. Usage: node check.mjs BASE_URL MODEL
import { createOpenAI } from "@ai-sdk/openai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { generateObject, generateText, jsonSchema, streamText, tool } from "ai";
import { z } from "zod";

const [baseURL, model] = process.argv.slice(2);
const Colour = z.object({ colour: z.string().max(16), count: z.number().int().min(0).max(99) });
const weather = tool({
  description: "The weather now in a city",
  inputSchema: jsonSchema({
    type: "object", additionalProperties: false, required: ["city"],
    properties: { city: { type: "string", maxLength: 40 } },
  }),
});
const settings = { temperature: 0, maxOutputTokens: 64, maxRetries: 0 };

async function check(provider) {
  const text = await generateText({ model: provider, prompt: "Name a colour.", ...settings });
  const streamed = streamText({ model: provider, prompt: "Name a colour.", ...settings });
  let chunks = 0;
  for await (const _ of streamed.textStream) chunks += 1;
  const object = await generateObject({
    model: provider, schema: Colour, prompt: "Give a colour and a count.", ...settings,
    maxOutputTokens: 96,
  });
  const called = await generateText({
    model: provider, prompt: "What is the weather in Paris?", tools: { get_weather: weather },
    toolChoice: "required", ...settings,
  });
  return {
    text: text.text, finishReason: text.finishReason, streamedChunks: chunks,
    streamedText: await streamed.text, object: object.object,
    toolCalls: called.toolCalls.map((call) => ({ name: call.toolName, input: call.input })),
  };
}

const compatible = createOpenAICompatible({
  name: "appliance", baseURL, apiKey: "unused", supportsStructuredOutputs: true,
});
const openai = createOpenAI({ baseURL, apiKey: "unused" });
console.log(JSON.stringify({
  compatible: await check(compatible(model)),
  responses: await check(openai(model)),  // the provider's default: POST /responses
}));
