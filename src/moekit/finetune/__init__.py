"""Fine-tuning and post-training MoE models: LoRA on experts, routing record and replay.

- ``add_lora`` / ``merge_lora`` / ``adapter_state_dict`` (``finetune.lora``): per-expert
  LoRA adapters on stacked experts (``moekit.experts.LoRAExperts``);
- ``record_routing`` / ``replay_routing`` / ``flip_rate`` (``finetune.replay``): the
  experts each MoE layer chose, recorded and replayed (routing replay for RL).
"""

from .lora import adapter_state_dict, add_lora, lora_experts, merge_lora, trainable_parameters

__all__ = ["adapter_state_dict", "add_lora", "lora_experts", "merge_lora", "trainable_parameters"]
