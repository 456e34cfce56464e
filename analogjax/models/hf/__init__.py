"""Hugging Face interop: decoder-family safetensors + config.json ⇄ analogjax params.

Import reads tensor by tensor onto the mesh: each device's shard is cut out of the safetensors files with
`get_slice`, so no host ever holds a whole model (a stacked [layers, ...] shard reads only the layers it covers).
Export writes the HF layout back (process 0), so `AutoModelForCausalLM.from_pretrained` loads it with no custom code.

Covered, exactly (logits equal to transformers' in float32): Llama 2/3/3.x (RoPE scaling llama3, linear, yarn),
Mistral (sliding window), Qwen2/2.5 (q/k/v biases, yarn, sliding layers), Qwen3 (q/k norms), Gemma (embedding
scale, norm offset, tanh-GELU), Gemma 2 (sandwich norms, attention and final soft-caps, query_pre_attn_scalar,
alternating sliding/full layers), Gemma 3 text (q/k norms, 5:1 pattern, local and global RoPE bases and scaling),
Phi-3 (fused qkv and gate/up projections, sliding window), OLMo 2 (post-norms, q/k norms over all heads), the
mixture-of-experts families Mixtral, Qwen2-MoE (shared expert), Qwen3-MoE, OLMoE and gpt-oss (attention sinks,
alternating sliding/full layers, biases on q/k/v/o, the router and the experts, clamped SwiGLU, YaRN; its released
MXFP4 expert weights are dequantized at import; export writes float32/bfloat16 experts, not MXFP4), Llama 4
text (Llama4ForCausalLM, and Llama4ForConditionalGeneration's language model: chunked and NoPE layers, temperature
tuning, L2 q/k norm, interleaved RoPE pairs, input-weighted sigmoid MoE with a shared expert, fused experts),
DeepSeek-V3 (multi-head latent attention, models/mla.py; sigmoid group-limited routing with a selection bias, shared
experts, dense first layers; Kimi K2's config.json reads as this family, families.py says where) and GLM-4.5
(partial rotary, q/k norms, q/k/v biases, the same routing).

The modules, one job each:
- families.py: one record per HF architecture (its config keys, conventions, tensor spellings, MoE routing);
  llama4.py: Llama 4's per-layer config keys.
- convert.py (+ rope.py): config.json ⇄ ModelConfig both ways, under the refusal rule (nothing read is ignored).
- tensors.py: the one tensor table, which HF tensor holds each of our params and how its axes move.
- read.py: import (safetensors, sharded reads, `HFModel`, `load`); write.py: export (`save`, `save_params`).
- mxfp4.py: MXFP4 blocks + scales → float32, as transformers dequantizes them (read slice by slice).
"""

from analogjax.data.tokenizer_files import byte_tokenizer_json, write_tokenizer
from analogjax.models.hf.convert import (
    CONFIG_FILE,
    architecture_for,
    config_from_hf_dict,
    hf_config,
    model_config_from_hf,
)
from analogjax.models.hf.families import ARCHITECTURES, FAMILIES, Family, MoEFamily
from analogjax.models.hf.read import HFModel, load, load_params, params_from_tensors
from analogjax.models.hf.tensors import INDEX_FILE, WEIGHTS_FILE, TensorMap, tensor_maps
from analogjax.models.hf.write import check_out_dir, folder_fingerprint, prepare_out_dir, save, save_params
from analogjax.models.model import Model

__all__ = [
    "load",
    "load_params",
    "params_from_tensors",
    "model_config_from_hf",
    "config_from_hf_dict",
    "save",
    "save_params",
    "Model",
    "HFModel",
    "architecture_for",
    "hf_config",
    "tensor_maps",
    "byte_tokenizer_json",
    "write_tokenizer",
    "folder_fingerprint",
    "check_out_dir",
    "prepare_out_dir",
    "TensorMap",
    "Family",
    "MoEFamily",
    "FAMILIES",
    "ARCHITECTURES",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "INDEX_FILE",
]
