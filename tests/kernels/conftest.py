"""Tiny causal LMs built from configs (no model hub): GPT-2 (Conv1D linears) and Llama (nn.Linear)."""
import pytest
import torch

VOCAB = 128


def tiny_gpt2(seed: int = 0, dtype=torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).to(dtype).eval()


def tiny_llama(seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        num_hidden_layers=2,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).to(dtype).eval()


BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}
TARGETS = {
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.fixture
def token_ids():
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(0, VOCAB, (2, 12), generator=gen)


def randomize_lora(model, seed: int = 0, std: float = 0.1):
    """Give every adapter random values (B non-zero, so the low-rank path changes the output)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_A" in name or "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


# Test modules reach the helpers above through fixtures: tests/ is not a package, so they cannot
# import this file by name (and two files are called conftest).
@pytest.fixture
def build_model():
    """build_model(arch, seed=0, dtype=torch.float32) -> a tiny eval-mode causal LM ('gpt2' or 'llama')."""

    def build(arch, seed=0, dtype=torch.float32):
        return BUILDERS[arch](seed=seed, dtype=dtype)

    return build


@pytest.fixture
def lora_targets():
    return TARGETS


@pytest.fixture
def randomize():
    return randomize_lora
