"""Fine-tuning and post-training MoE models: LoRA on experts, mixtures of LoRA experts,
routing record and replay.

- ``add_lora`` / ``merge_lora`` / ``adapter_state_dict`` (``finetune.lora``): per-expert
  LoRA adapters on stacked experts (``moekit.experts.LoRAExperts``);
- ``mixlora`` (``finetune.mixlora``): a frozen dense FFN turned into a router over LoRA
  experts that share it (mixture of LoRA experts);
- ``record_choices`` / ``replay_choices`` / ``flip_rate`` (``finetune.replay``): the
  experts each MoE layer chose, recorded and replayed (routing replay for RL).
"""

from .lora import adapter_state_dict, add_lora, lora_experts, merge_lora, trainable_parameters
from .mixlora import mixlora
from .replay import ChoiceRecord, flip_rate, record_choices, replay_choices

__all__ = ["ChoiceRecord", "adapter_state_dict", "add_lora", "flip_rate", "lora_experts", "merge_lora",
           "mixlora", "record_choices", "replay_choices", "trainable_parameters"]
