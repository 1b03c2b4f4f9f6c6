"""`--network_module networks.lora`: sd-scripts' module name for Stable Diffusion 1.x / 2.x LoRA
(LoRA-LierLa, and LoRA-C3Lier with conv_dim). The targets live in networks/lora_sd.py; the LoRA
implementation every family shares is networks/lora_core.py."""

from networks.lora_sd import create_network, create_network_from_weights  # noqa: F401  (sd-scripts' entry points)
