"""GGUF export for llama.cpp: blocks (our integers as Q4_0 / Q4_1 / Q8_0), layout (names and
conventions per family), vocab (tokenizer metadata), export (the command)."""
