"""Tiny Hugging Face transformers written by the tools people deploy with: optimum's
``main_export`` and onnxruntime-genai's model builder.

Run as a script with the interpreter of the deploy-tools environment (``make test`` builds
``.venv-deploy``: optimum-onnx 0.1.0 needs transformers < 4.58, onnxruntime-genai 0.15.2 is
the newest builder that imports beside it)::

    python deploy_tools.py OUT NAME...

For each model it writes ``OUT/NAME/hf`` (the weights, every parameter random, and a tiny
word-level tokenizer: the builder wants one), ``OUT/NAME/optimum/model.onnx`` (decoders:
``text-generation-with-past``) and, for decoders, ``OUT/NAME/genai/model.onnx`` (fp32, CPU).
The tests export ``hf`` with torch.onnx themselves, in the main environment, for the reference.

Sizes: head size 16 (onnxruntime's GroupQueryAttention kernel wants a multiple of 16 with
rotary embeddings inside); the vocabulary (101) equals no width, as the builder takes any
Linear as wide as the vocabulary for the LM head.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

VOCAB = 101
HIDDEN = 64
DECODERS = ("gpt2", "llama", "qwen2", "mistral", "phi3")
ENCODERS = ("bert", "distilbert", "roberta", "deberta", "albert", "vit", "swin")
#: models that take pixels
IMAGES = ("vit", "swin")
#: optimum's task per model
TASKS = {**{n: "text-generation-with-past" for n in DECODERS}, **{n: "text-classification" for n in ENCODERS},
         "vit": "image-classification", "swin": "image-classification"}
#: decoders onnxruntime-genai's builder writes (it has no GPT-2)
GENAI = ("llama", "qwen2", "mistral", "phi3")
#: key/value heads of the decoders (4 query heads each, head size HIDDEN // 4)
KV_HEADS = {"gpt2": 4, "llama": 2, "qwen2": 2, "mistral": 2, "phi3": 2}


def build(name: str, seed: int = 0):
    """The model in eval mode with every parameter drawn at random (support.random_weights)."""
    import torch
    import transformers as t

    from support.random_weights import randomize

    common = dict(num_hidden_layers=2, num_attention_heads=4, intermediate_size=96)
    decoder = dict(vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=64, tie_word_embeddings=False,
                   **common)
    configs = {
        "bert": lambda: t.BertForSequenceClassification(t.BertConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=32, num_labels=3, **common)),
        "distilbert": lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=VOCAB, dim=HIDDEN, n_layers=2, n_heads=4, hidden_dim=96, max_position_embeddings=32,
            num_labels=3)),
        "roberta": lambda: t.RobertaForSequenceClassification(t.RobertaConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=40, num_labels=3, **common)),
        "deberta": lambda: t.DebertaV2ForSequenceClassification(t.DebertaV2Config(
            vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=32, num_labels=3, relative_attention=True,
            pos_att_type=["p2c", "c2p"], position_buckets=8, max_relative_positions=16, **common)),
        "albert": lambda: t.AlbertForSequenceClassification(t.AlbertConfig(
            vocab_size=VOCAB, embedding_size=32, hidden_size=HIDDEN, max_position_embeddings=32, num_labels=3,
            hidden_act="gelu_new", **common)),
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(
            image_size=16, patch_size=4, num_channels=3, hidden_size=HIDDEN, num_labels=5, **common)),
        "swin": lambda: t.SwinForImageClassification(t.SwinConfig(
            image_size=16, patch_size=2, num_channels=3, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
            window_size=3, num_labels=5)),
        "gpt2": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4,
                                                       n_positions=64)),
        "llama": lambda: t.LlamaForCausalLM(t.LlamaConfig(num_key_value_heads=2, **decoder)),
        "qwen2": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(num_key_value_heads=2, **decoder)),
        "mistral": lambda: t.MistralForCausalLM(t.MistralConfig(num_key_value_heads=2, sliding_window=4, **decoder)),
        "phi3": lambda: t.Phi3ForCausalLM(t.Phi3Config(num_key_value_heads=2, pad_token_id=0, original_max_position_embeddings=64, **decoder)),
    }
    torch.manual_seed(seed)
    return randomize(configs[name](), seed)


def _save(name: str, folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, ViTImageProcessor

    build(name).save_pretrained(folder)
    if name in IMAGES:
        ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
        return
    tokenizer = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="w0", bos_token="w1", eos_token="w2",
                            pad_token="w0").save_pretrained(folder)


def write(out: Path, name: str) -> None:
    from optimum.exporters.onnx import main_export

    folder = out / name
    _save(name, folder / "hf")
    main_export(str(folder / "hf"), output=str(folder / "optimum"), task=TASKS[name], device="cpu",
                do_validation=False)
    if name in GENAI:
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder / "hf"),
                        "-o", str(folder / "genai"), "-p", "fp32", "-e", "cpu", "-c", str(out / "builder-cache")],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    (folder / "done.json").write_text(json.dumps({"name": name}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder: support.random_weights
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.simplefilter("ignore")
    target = Path(sys.argv[1])
    for model_name in sys.argv[2:]:
        write(target, model_name)
