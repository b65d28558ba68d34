"""Explaining a transformer end to end: a tiny BERT classifier, AttnLRP, token relevance.

The model is built from a config with seeded random weights (nothing is downloaded), so
its "opinions" are arbitrary; the pipeline is the real one:

1. export the Hugging Face model to ONNX (token ids and attention mask in, logits out);
2. compile it with the AttnLRP preset: one ONNX file returning logits and relevance;
3. run that file in onnxruntime alone, for a batch of tokenized sentences;
4. show each token's relevance (the relevance of its embedding, summed over features)
   as a text heatmap in the terminal and as HTML.

Run: python examples/explain_transformer.py [OUT_DIR]     (needs torch and transformers)
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertForSequenceClassification

import lrpc

WORDS = "[PAD] [UNK] the movie was not good but the actors were great and the plot clever".split()
SENTENCES = ["the movie was not good", "the actors were great and the plot clever"]


def tiny_bert(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(WORDS), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():  # Hugging Face starts biases at 0 and LayerNorm at 1: make every weight random
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


class Classifier(torch.nn.Module):
    """(input_ids, attention_mask) -> logits, the signature deployed models have."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).logits


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(SENTENCES)
    ids = np.array([e.ids for e in batch], dtype=np.int64)
    mask = np.array([e.attention_mask for e in batch], dtype=np.int64)

    # 1. export (the exporter's warnings about Python control flow in the model are expected)
    model_path = out_dir / "bert.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(Classifier(tiny_bert()).eval(), (torch.from_numpy(ids), torch.from_numpy(mask)),
                          str(model_path), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                        "attention_mask": {0: "batch", 1: "sequence"}, "logits": {0: "batch"}})

    # 2. compile: which rule each layer gets is one table away (lrpc inspect)
    compiled_path = out_dir / "bert.lrp.onnx"
    lrpc.compile_file(model_path, compiled_path, lrpc.AttnLRP())
    rules = lrpc.lrp_rules(model_path, lrpc.AttnLRP())
    print(f"{len(rules)} layers; e.g. {rules[1][0].name} -> {rules[1][1]!r}")

    # 3. the compiled file alone explains, in one onnxruntime call
    options = ort.SessionOptions()
    options.log_severity_level = 3  # onnxruntime notes that lrp_target has a default; that is intended
    session = ort.InferenceSession(str(compiled_path), options, providers=["CPUExecutionProvider"])
    logits, relevance = session.run(["logits", "relevance"], {"input_ids": ids, "attention_mask": mask})
    print("relevance at the word embeddings:", relevance.shape)  # [N, T, hidden]

    # 4. one value per token
    for i, encoding in enumerate(batch):
        n = int(mask[i].sum())
        text = lrpc.text_heatmap(encoding.tokens[:n], relevance[i, :n].sum(-1))
        shares = text.relevance / np.abs(text.relevance).sum()  # each token's share of the total
        print(f"class {int(logits[i].argmax())}:", " ".join(f"{t}({v:+.0%})" for t, v in zip(text.tokens, shares)))
        (out_dir / f"sentence_{i}.html").write_text(text.to_html())

    # the Python API does the same (and fills the attention mask with ones when left out)
    analyzer = lrpc.LRP(str(model_path), lrpc.AttnLRP())
    expl = analyzer.analyze(ids, extra_inputs={"attention_mask": mask})
    print("same as the API:", bool(np.allclose(expl.val, relevance, rtol=1e-5, atol=1e-7)))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("transformer_out"))
