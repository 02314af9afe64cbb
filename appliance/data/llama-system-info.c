#include <stdio.h>
const char *llama_print_system_info(void);
int main(void) { puts(llama_print_system_info()); return 0; }
