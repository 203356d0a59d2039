"""`widthlab kernel` on the command line (issue 5; reference D ≈ 1.2e-3, Golubeva et al. 2021, Theorem 1)."""

import json

from widthlab.cli import main


def test_kernel_json_matches_spec_value(capsys):
    assert main(["kernel", "--d", "784", "--width", "200", "--connectivity", "0.1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    # Reference check: network MC 1.24e-3, mask MC 1.18e-3 on other random pairs; our error as an estimate of
    # the pair-mean is D_pairs_se (pairs) + D_se (masks).
    tol = 3 * (out["D_pairs_se"] + out["D_se"])
    assert abs(out["D"] - 1.2e-3) < max(tol, 0.05e-3)
    assert out["D"] == out["bias_sq"] + out["variance_term"] or abs(
        out["D"] - out["bias_sq"] - out["variance_term"]) < 1e-12
    for key in ("D_se", "bias_sq_se", "variance_term_se", "approx_eq4", "approx_variance_only", "p_star"):
        assert key in out


def test_kernel_on_dataset_inputs_and_bad_input(capsys):
    assert main(["kernel", "--d", "64", "--width", "50", "--connectivity", "0.5", "--inputs", "digits",
                 "--pairs", "20"]) == 0
    assert capsys.readouterr().out.startswith("D = ")
    assert main(["kernel", "--d", "10", "--width", "50", "--connectivity", "0.5", "--inputs", "digits"]) == 2
    assert "64 features" in capsys.readouterr().err
    assert main(["kernel", "--d", "784", "--width", "200", "--connectivity", "0"]) == 2
    assert main(["kernel", "--d", "784", "--width", "200", "--connectivity", "0.1", "--inputs", "nope"]) == 2


def test_kernel_cli_reports_the_network_check(capsys):
    """``--networks K`` adds the library's independent check: D averaged over K sampled whole networks,
    which Theorem 1 of Golubeva et al. (2021) predicts exactly, so the two agree within Monte-Carlo error."""
    args = ["kernel", "--d", "100", "--width", "50", "--connectivity", "0.2", "--pairs", "5",
            "--masks", "256", "--networks", "40"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "network check: D = " in text and "40 sampled networks" in text
    assert main([*args, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["networks"] == 40
    assert abs(out["D_network"] - out["D"]) < 3 * (out["D_se"] ** 2 + out["D_network_se"] ** 2) ** 0.5
    assert main(args[:-2]) == 0
    assert "network check" not in capsys.readouterr().out
    assert main([*args[:-1], "-1"]) == 2
    assert "--networks" in capsys.readouterr().err
