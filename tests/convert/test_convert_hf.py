"""convert-mpnet hf: any HF MPNet layout (here transformers' own MPNetModel) -> native, verified."""
from __future__ import annotations

import json

import pytest
import torch

from fixtures import make_tokenizer, tiny_config
from cli_support import assert_one_line_error_text, call_main, cli_main


def test_hf_mpnet_model_directory_converts_and_verifies(tmp_path):
    from transformers import MPNetConfig as HFConfig
    from transformers import MPNetModel

    from mpnet import MPNetForPretraining
    main = cli_main("convert")

    tokenizer = make_tokenizer()
    ours = tiny_config(tokenizer)
    hf_config = HFConfig(**{k: getattr(ours, k) for k in ("vocab_size", "hidden_size", "num_hidden_layers",
                                                          "num_attention_heads", "intermediate_size",
                                                          "max_position_embeddings", "layer_norm_eps")})
    torch.manual_seed(0)
    src = tmp_path / "hf"
    MPNetModel(hf_config).save_pretrained(str(src))  # no "mpnet." prefix, with a pooler, no LM head
    tokenizer.save_pretrained(str(src))
    code, err = call_main(main, "hf", src, "--output-dir", tmp_path / "native")
    assert code == 0, err
    report = json.loads((tmp_path / "native" / "conversion.json").read_text())
    assert report["max_abs_diff_vs_transformers"] <= 1e-5
    model = MPNetForPretraining.from_pretrained(tmp_path / "native")
    assert model.config.vocab_size == len(tokenizer)
    assert (tmp_path / "native" / "tokenizer_config.json").is_file()

    assert_one_line_error_text(*call_main(main, "hf", tmp_path / "absent", "--output-dir", tmp_path / "x"), "absent")


def test_a_sentence_transformers_model_keeps_its_packaging_and_gets_no_invented_lm_head(tmp_path):
    """convert-mpnet hf on a sentence-transformers model (an encoder, mean pooling, Normalize) used to save a
    random LM head and drop the pooling and Normalize modules: SentenceTransformer(output) then gave unnormalised
    embeddings. Now the output embeds as the source does, and so does a checkpoint saved again from it (what
    continued pretraining and fine-tuning write)."""
    sentence_transformers = pytest.importorskip("sentence_transformers")
    import transformers
    from sentence_transformers import models as modules
    from safetensors.torch import load_file

    from mpnet import MPNetForPretraining

    tokenizer = make_tokenizer()
    fields = transformers.MPNetConfig().to_dict()
    config = transformers.MPNetConfig(**{k: v for k, v in tiny_config(tokenizer).to_dict().items() if k in fields})
    torch.manual_seed(0)
    transformers.MPNetModel(config).save_pretrained(str(tmp_path / "encoder"))
    tokenizer.save_pretrained(str(tmp_path / "encoder"))
    encoder = modules.Transformer(str(tmp_path / "encoder"), max_seq_length=200)
    source = sentence_transformers.SentenceTransformer(
        modules=[encoder, modules.Pooling(encoder.get_embedding_dimension(), "mean"), modules.Normalize()])
    source.save(str(tmp_path / "st"))

    out = tmp_path / "converted"
    code, err = call_main(cli_main("convert"), "hf", tmp_path / "st", "--output-dir", out)
    assert code in (0, None), err
    assert not [k for k in load_file(str(out / "model.safetensors")) if k.startswith("lm_head.")]
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MPNetModel"]
    assert "absent" in json.loads((out / "conversion.json").read_text())["lm_head"]

    again = tmp_path / "saved-again"  # our model loaded and saved, as every later checkpoint is
    MPNetForPretraining.from_pretrained(out).save_pretrained(again, tokenizer=tokenizer)
    sentences = ["the movie was good .", "bad , bad movie ."]
    reference = source.encode(sentences)
    for directory in (out, again):
        model = sentence_transformers.SentenceTransformer(str(directory))
        embeddings = model.encode(sentences)
        assert abs(embeddings - reference).max() <= 1e-5, directory
        assert abs((embeddings ** 2).sum(1) - 1).max() <= 1e-5  # Normalize kept
        assert model.max_seq_length == source.max_seq_length
