"""Anima: Cosmos-Predict2's MiniTrainDIT with the LLM adapter, Qwen3-0.6B, the Qwen-Image VAE.

    model.py        Anima, AnimaParams (the DiT in the checkpoint's module names, 3-D RoPE)
    llm_adapter.py  LLMAdapter (Qwen3 hidden states + T5 ids -> the DiT's text context)
    loading.py      inspect_anima_checkpoint, load_anima_dit (`net.` prefix, --llm_adapter_path)
    vae.py          QwenImageVAE, load_qwen_image_vae (Wan/ComfyUI and diffusers layouts)
    text.py         load_qwen3, tokenizers, AnimaTextEncoding, AnimaTextOutputs
    sampling.py     flow_shift_sigmas, denoise (Euler + CFG), generate_image
    arguments.py    the family's command-line options and their checks
"""
