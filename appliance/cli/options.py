"""The options several `pi-appliance` verbs take, each defined once with its default from the
layout or the settings, so that `--models-dir` means the same wherever it is typed."""

from __future__ import annotations

import argparse
from pathlib import Path

from appliance import layout
from appliance.settings import CONFIG_ENV_VAR, DEFAULT_CONFIG_PATH


def add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help=f"TOML file (default: ${CONFIG_ENV_VAR} or {DEFAULT_CONFIG_PATH})")


def add_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="JSON instead of text")


def add_state_dir(parser: argparse.ArgumentParser, *, at_verb: bool = False) -> None:
    # On a verb below a group that has the option too, SUPPRESS keeps the verb's default from
    # overwriting a value given before the verb (`model --models-dir X list`).
    parser.add_argument("--state-dir", type=Path,
                        default=argparse.SUPPRESS if at_verb else layout.STATE_DIR,
                        help=f"the appliance's state directory (default {layout.STATE_DIR})")


def add_models_dir(parser: argparse.ArgumentParser, *, at_verb: bool = False) -> None:
    parser.add_argument("--models-dir", type=Path,
                        default=argparse.SUPPRESS if at_verb else layout.MODELS_DIR,
                        help=f"the model store (default {layout.MODELS_DIR})")


def add_hardware_root(parser: argparse.ArgumentParser) -> None:
    # Where /proc and /sys are read from: fixture boards in tests.
    parser.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
