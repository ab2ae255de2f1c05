"""What the commands run, above training and serving: SVD tools, planning, merging, quantizing, generation.

    svd.py, svdtools.py   truncated SVD of ΔW; extract / resize / combine adapters
    plan.py               parameters and memory of full fine-tuning vs LoRA vs QLoRA
    merge.py, quantize.py `deltaw merge` and `deltaw quantize`
    generation.py, chat.py  generation with named adapters; `deltaw generate` and `deltaw chat`
"""
