"""Generate a tiny random-weight Mixtral-style MoE model and tokenizer that a real vLLM can serve.

Run with the vLLM virtualenv's python (it needs torch, transformers and tokenizers):

    .venv-vllm/bin/python tools/make_tiny_moe.py DIR

Nothing is downloaded: the weights are random (seeded) and the tokenizer is a small BPE
trained here on a built-in text. head_dim is 64 because vLLM's CPU attention kernels accept
only some head sizes (32, 64, 80, 96, 112, 128, ...).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]

_CORPUS = """\
the power cap is a live control knob for every gpu in the data centre
mixture of experts models activate a fraction of their weights for each token
a batch limit trades latency for throughput and tokens per joule
the facility budget changes with grid limits cooling and electricity prices
palsd reads metrics from vllm and sets power limits and batch limits
time to first token and inter token latency are the service level objectives
""".splitlines()


def make_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    fast.save_pretrained(out)


def make_model(out: Path, vocab_size: int, seed: int, size: dict[str, int]) -> None:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=vocab_size,
        head_dim=64,
        num_experts_per_tok=2,
        **size,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
    )
    model = MixtralForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="directory to write the model into")
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    # Big enough that a decode step takes milliseconds, not microseconds: with a faster engine
    # vLLM's API server (one event loop) can fall behind its output stream on a busy 2-core
    # machine and stop answering /metrics until generation ends.
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--intermediate-size", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    make_tokenizer(args.out, args.vocab_size)
    vocab = len(json.loads((args.out / "tokenizer.json").read_text())["model"]["vocab"])
    # The model's vocabulary must cover every id the tokenizer can emit.
    size = {
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.layers,
        "num_attention_heads": args.heads,
        "num_key_value_heads": args.kv_heads,
        "num_local_experts": args.experts,
    }
    make_model(args.out, max(vocab, args.vocab_size), args.seed, size)
    print(f"tiny MoE written to {args.out}")


if __name__ == "__main__":
    main()
