"""One description of a decoder-only transformer, whatever file it came from.

One model family, configured rather than forked: Llama (RMSNorm, RoPE, SwiGLU, no biases) and GPT-2
(LayerNorm with bias, learned absolute positions, GELU MLP, biases) differ only in the fields below the
shape, and share one attention, one KV cache and every decoding path."""

from __future__ import annotations

from dataclasses import asdict, dataclass

NORMS = ("rmsnorm", "layernorm")
PLACEMENTS = ("pre", "post")
POSITIONS = ("rope", "learned")
MLPS = ("swiglu", "gelu", "gelu_tanh")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int  # d_model
    intermediate_size: int  # SwiGLU hidden width
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads (grouped-query attention when < num_heads)
    head_dim: int
    context_length: int  # max positions the model was trained for
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    architecture: str = "llama"  # what the checkpoint calls itself ("llama", "gpt2", ...)
    # --- the choices that make the family (defaults: Llama) ---
    norm: str = "rmsnorm"  # "rmsnorm" | "layernorm" (with bias); eps is rms_norm_eps for both
    norm_placement: str = "pre"  # "pre": x + f(norm(x)); "post": norm(x + f(x)) (original Transformer)
    position: str = "rope"  # "rope" | "learned" (absolute position table added to the embeddings)
    mlp: str = "swiglu"  # "swiglu" | "gelu" (exact) | "gelu_tanh" (GPT-2's "gelu_new")
    bias: bool = False  # biases in the attention and MLP projections

    def __post_init__(self):
        for name, allowed in (("norm", NORMS), ("norm_placement", PLACEMENTS), ("position", POSITIONS),
                              ("mlp", MLPS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"model: {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.num_heads % self.num_kv_heads or self.num_heads <= 0:
            raise ValueError(f"model: num_heads {self.num_heads} is not a multiple of num_kv_heads "
                             f"{self.num_kv_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        names = cls.__dataclass_fields__.keys()
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def from_hf_config(cls, c: dict) -> ModelConfig:
        """From a Hugging Face `config.json` of a Llama-architecture checkpoint."""
        heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"],
            hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads,
            context_length=c.get("max_position_embeddings", 2048),
            rms_norm_eps=c.get("rms_norm_eps", 1e-5),
            # transformers >= 5 nests it under rope_parameters
            rope_theta=c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0),
            tie_word_embeddings=c.get("tie_word_embeddings", False),
            architecture=c.get("model_type", "llama"),
        )
