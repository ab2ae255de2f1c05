"""Base models: loading (the bundled GGUF, HF directories, .gguf files, NF4 directories), quantized bases, export.

    loading.py    load_model and the cached GGUF conversion
    quantized.py  quantize a model, NF4 directories in bitsandbytes' layout, merging into NF4
    export.py     a merged model as an HF directory; unload
    chat.py       chat prompts through the tokenizer's template
"""
