"""convert-mpnet hf: any HF MPNet layout (here transformers' own MPNetModel) -> native, verified."""
from __future__ import annotations

import json

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
