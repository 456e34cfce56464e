"""Transfer checks: maps, probes and steering on planted synthetic activations (float64 NumPy references), concept
labels against hand labels, concept-file errors, and the report of a tiny run through the CLI."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from analogjax import cli
from analogjax.errors import UserError
from analogjax.fidelity import concepts, intervals, transfer
from analogjax.runtime.batch_sums import add_sums


def _moments(x, y, w=None, chunks=1):
    total = {}
    w = np.ones(len(x), np.float32) if w is None else w
    for part in np.array_split(np.arange(len(x)), chunks):
        total = add_sums(total, transfer.moments(jnp.asarray(x[part]), jnp.asarray(y[part]), jnp.asarray(w[part])))
    return total


def _affine_data(rng, n, a, b, noise):
    x = rng.standard_normal((n, a.shape[0])) * 2.0 + 1.0
    return x, x @ a + b + noise * rng.standard_normal((n, a.shape[1]))


def test_map_recovers_a_known_affine_function_and_explained_variance_matches_the_noise():
    rng = np.random.default_rng(0)
    a, b, noise = rng.standard_normal((6, 9)), rng.standard_normal(9), 0.5
    x, y = _affine_data(rng, 6000, a, b, noise)
    weight, bias = transfer.fit_affine(_moments(x, y))
    np.testing.assert_allclose(weight, a, atol=0.02)
    np.testing.assert_allclose(bias, b, atol=0.05)
    # Held-out tokens: explained variance = 1 − noise variance / total variance (float64 NumPy, from the data).
    x2, y2 = _affine_data(rng, 6000, a, b, noise)
    direct = 1 - np.sum((y2 - x2 @ weight - bias) ** 2) / np.sum((y2 - y2.mean(0)) ** 2)
    assert transfer.explained_variance(_moments(x2, y2), weight, bias) == pytest.approx(direct, abs=1e-4)
    expected = 1 - 9 * noise**2 / np.sum(y2.var(0))
    assert direct == pytest.approx(expected, abs=0.01)
    # The reverse map (teacher → analog): the documented ridge, written directly in float64 on centred data.
    back_w, back_b = transfer.fit_affine(transfer.reversed_moments(_moments(x, y)))
    yc, xc = y - y.mean(0), x - x.mean(0)
    cyy = yc.T @ yc / len(y)
    ref = np.linalg.solve(cyy + transfer.MAP_RIDGE * np.trace(cyy) / 9 * np.eye(9), yc.T @ xc / len(y))
    np.testing.assert_allclose(back_w, ref, atol=2e-4)
    np.testing.assert_allclose(back_b, x.mean(0) - y.mean(0) @ ref, atol=2e-4)


def test_statistics_of_two_halves_sum_to_one_pass():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((500, 4)), rng.standard_normal((500, 3))
    w = (rng.random(500) > 0.3).astype(np.float32)
    one, halves = _moments(x, y, w, chunks=1), _moments(x, y, w, chunks=2)
    for key in one:
        np.testing.assert_allclose(halves[key], one[key], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(one["sxy"], (x * w[:, None]).T @ y, rtol=1e-4, atol=1e-3)


def _planted(rng, n, planted: bool, ds=8, dt=16):
    """Analog x (concept along u when planted, else absent) and teacher y = x A + b + noise, plus the concept
    added on the teacher's own direction u A whatever the analog does (so the teacher always knows it)."""
    labels = (rng.random(n) < 0.3).astype(np.int8)
    u = np.eye(ds)[0] * 3.0
    a = rng.standard_normal((ds, dt)) / np.sqrt(ds)
    x = rng.standard_normal((n, ds)) + (labels[:, None] * u if planted else 0.0)
    teacher_concept = labels[:, None] * (u @ a) * (0.0 if planted else 1.0)
    y = x @ a + 0.3 + 0.05 * rng.standard_normal((n, dt)) + teacher_concept
    return x, y, labels, u @ a


def _probe_and_steering(planted: bool):
    rng = np.random.default_rng(2)
    x, y, labels, teacher_direction = _planted(rng, 4000, planted)
    fit, ev = slice(0, 2000), slice(2000, None)
    m = _moments(x[fit], y[fit])
    weight, _ = transfer.fit_affine(m)
    back_w, back_b = transfer.fit_affine(transfer.reversed_moments(m))

    def probe_stats(feats):
        f, t = feats[fit], labels[fit].astype(np.float64)
        return len(f), f.sum(0), f.T @ f, t.sum(), (f * t[:, None]).sum(0)

    def accuracy(feats, w, b):
        return np.mean(((feats[ev] @ w + b) > 0) == (labels[ev] == 1))

    wa, ba = transfer.fit_probe(*probe_stats(x))
    wn, bn = transfer.fit_probe(*probe_stats(y))
    transferred = accuracy(y, back_w @ wa, back_b @ wa + ba)
    chance = max(labels[ev].mean(), 1 - labels[ev].mean())
    probe = transfer.recovered(transferred, chance, accuracy(y, wn, bn))

    # A hand-built teacher "rest": logits read the residual through a head whose marker token (0) reads the
    # teacher's concept direction.
    vocab, dt = 5, y.shape[1]
    head = np.zeros((dt, vocab), np.float32)
    head[:, 0] = 4 * teacher_direction / np.linalg.norm(teacher_direction)
    n, s, _, t, sxpos = probe_stats(y)
    native = transfer.difference_of_means(n, s, t, sxpos)
    n, s, _, t, sxpos = probe_stats(x)
    carried = transfer.difference_of_means(n, s, t, sxpos) @ weight
    randoms = np.random.default_rng(3).standard_normal((8, dt))
    directions = np.stack([native, carried, *randoms])
    directions = directions / np.linalg.norm(directions, axis=1, keepdims=True)
    h = jnp.asarray(y[ev][None].astype(np.float32))  # [1, s, dt]
    outside = jnp.asarray((labels[ev] == 0)[None, :, None].astype(np.float32))
    effect, count = transfer.steering_sums(
        lambda r: r @ jnp.asarray(head),
        h,
        jnp.asarray(directions, jnp.float32),
        jnp.zeros(len(directions), jnp.int32),
        jnp.asarray(np.eye(vocab, dtype=np.float32)[:1]),
        outside,
    )
    effect = np.asarray(effect) / np.asarray(count)
    assert effect[0] > 0.05  # the native direction does push the marker
    steering = transfer.recovered(effect[1], effect[2:].mean(), effect[0])
    return probe, steering


def test_planted_concept_transfers_and_an_unrelated_one_does_not():
    probe, steering = _probe_and_steering(planted=True)
    assert probe == pytest.approx(1.0, abs=0.1) and steering == pytest.approx(1.0, abs=0.1)
    probe, steering = _probe_and_steering(planted=False)
    assert abs(probe) < 0.15 and abs(steering) < 0.3


def test_marker_tokens_are_the_tokens_over_represented_after_the_concept():
    targets = np.array([[7, 8, 7, 9, 7, 8, 3, 3]])
    labels = np.array([[1, 0, 1, 0, 1, 0, 0, 0]])
    assert concepts.marker_tokens(targets, targets, np.ones_like(targets), labels, k=3) == [7]


SNIPPET = "if x == 'a#b':  # c1 (z)\n    y = f(42) + [3]\n"


def _bytes(text):
    from analogjax.data.tokenize import ByteTokenizer

    return concepts.encode_with_offsets(ByteTokenizer(), text)


def test_builtin_labels_match_hand_labels():
    _, offsets = _bytes(SNIPPET)  # one token per character: labels read as characters
    labels = concepts.builtin_labels(SNIPPET, offsets)

    def chars(name):
        return "".join(SNIPPET[k] for k in np.flatnonzero(labels[name] == 1))

    assert chars("python_string") == "'a#b'"
    assert chars("python_comment") == "# c1 (z)"
    assert chars("python_keyword") == "if"
    assert chars("python_number") == "423"
    assert chars("in_brackets") == "z423"
    assert chars("digit") == "1423"
    prose = "Is it in (the) list? 7 of them."  # not Python: the Python concepts are unlabelled, not negative
    labels = concepts.builtin_labels(prose, _bytes(prose)[1])
    assert all((labels[name] == -1).all() for name in concepts.PYTHON_CONCEPTS)
    assert "".join(prose[k] for k in np.flatnonzero(labels["in_brackets"] == 1)) == "the"


def test_labels_from_spans_any_overlap_and_specials_unlabelled():
    offsets = np.array([[0, 3], [3, 7], [7, 8], [8, 8]])
    np.testing.assert_array_equal(concepts.labels_from_spans(offsets, [(5, 6)]), [0, 1, 0, -1])
    np.testing.assert_array_equal(concepts.labels_from_spans(offsets, [(2, 4), (3, 5)]), [1, 1, 0, -1])
    ids, offs = _bytes("é1")  # two bytes for é: both tokens cover character 0
    assert list(ids) == [0xC3, 0xA9, ord("1")] and offs.tolist() == [[0, 1], [0, 1], [1, 2]]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"concept": "x", "text": "abc", "spans": [[0, 9]]}', "span [0, 9] is not inside the text"),
        ('{"concept": "x", "text": "abc", "spans": [[2, 1]]}', "span [2, 1]"),
        ('{"concept": "x", "text": "abc", "spans": [], "label": 1}', "unknown field(s) label"),
        ('{"concept": "x", "text": "abc"}', "missing field(s) spans"),
        ('{"concept": "digit", "text": "abc", "spans": []}', "built-in concept"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_bad_concept_lines_are_user_errors_naming_the_line(tmp_path, line, fragment):
    path = tmp_path / "c.jsonl"
    path.write_text('{"concept": "ok", "text": "abc", "spans": [[0, 1]]}\n' + line + "\n")
    with pytest.raises(UserError, match="c.jsonl:2") as info:
        concepts.read_user_concepts(path)
    assert fragment in str(info.value)


# ----------------------------------------------------------------------------------------------------------------
# A tiny run through the CLI: the analog is its own teacher, so everything must transfer.

SNIPPETS = [
    "def f(x):\n    # add one\n    return x + 1\n",
    "s = 'hello [world]' if a else (b, 2)\n",
    "for i in range(10):\n    print(i)  # loop\n",
    "class A:\n    pass\n",
    "y = [3, 4] * 5\n",
]
MODEL = {"vocab_size": 259, "d_model": 32, "n_layers": 2, "n_heads": 2, "d_ff": 64}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    rng = np.random.default_rng(0)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": "".join(rng.choice(SNIPPETS, 3))}) + "\n" for _ in range(200)))
    config = {
        "model": MODEL,
        "teacher": {"model": MODEL},
        "data": {
            "sources": [{"path": str(corpus)}],
            "tokenizer": "bytes",
            "global_batch": 8,
            "seq_len": 64,
            "heldout_fraction": 0.3,
        },
        "distill": {"terms": [{"kind": "ce", "weight": 1.0}]},
        "optim": {"learning_rate": 0.01, "warmup_steps": 1},
        "train": {"steps": 4, "seed": 0, "eval_batches": 1, "log_every": 2},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert (
        cli.main(["distill", "--config", str(root / "run.yaml"), "--workdir", str(root / "run"), "--no-progress"]) == 0
    )
    # The same model as its own teacher: maps are the identity, the analog's probes and directions are native.
    config["teacher"]["checkpoint"] = str(root / "run" / "checkpoints")
    (root / "self.yaml").write_text(yaml.safe_dump(config))
    lines = [
        {"concept": "assignment", "text": t, "spans": [[k, k + 1] for k, c in enumerate(t) if c == "="]}
        for t in SNIPPETS * 2
    ]
    (root / "concepts.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_transfer_command_report(tiny_run, tmp_path, capsys):
    out = tmp_path / "transfer"
    assert (
        cli.main(
            [
                "transfer",
                "--config",
                str(tiny_run / "self.yaml"),
                "--checkpoint",
                str(tiny_run / "run"),
                "--concepts",
                str(tiny_run / "concepts.jsonl"),
                "--out",
                str(out),
                "--fit-batches",
                "2",
                "--eval-batches",
                "1",
            ]
        )
        == 0
    )
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    report = json.loads((out / "transfer.json").read_text())
    for key in ("layer_pairs", "stitch", "probes", "steering"):
        assert key in report, key
    assert report["layer_pairs"] == [[0, 0], [1, 1]]
    for s in report["stitch"]:
        assert set(s) >= {
            "analog_layer",
            "teacher_layer",
            "explained_variance",
            "teacher_to_analog_explained_variance",
            "stitched_ce",
            "stitched_kl",
        }
        assert s["explained_variance"] > 0.99 and s["teacher_to_analog_explained_variance"] > 0.99
        assert s["stitched_kl"] < 1e-3 and s["stitched_ce"] == pytest.approx(report["teacher_ce"], abs=1e-2)
    names = {p["concept"] for p in report["probes"]}
    assert {"python_keyword", "digit", "assignment"} <= names
    for p in report["probes"]:
        assert set(p) >= {"concept", "chance", "analog", "teacher_native", "transferred", "recovered"}
        assert p["analog"] == pytest.approx(p["teacher_native"])
        assert p["transferred"] == pytest.approx(p["analog"], abs=0.02)
    for s in report["steering"]:
        assert set(s) >= {"concept", "native", "transferred", "random", "recovered"}
        assert s["transferred"] == pytest.approx(s["native"], rel=0.05, abs=1e-6)
    assert line["probe_recovered"].keys() == names
    # Separate budgets: 2 batches of 8 fit rows, 1 of 8 eval rows (the user concepts' texts add rows of their own).
    assert report["fit_rows"] >= 16 and report["eval_rows"] >= 8
    _assert_intervals_hold_their_figures(report)
    assert (out / "transfer.md").is_file() and (out / "transfer_explained_variance.png").is_file()
    assert "| concept | chance |" in (out / "transfer.md").read_text()
    assert "transferred to the teacher" in transfer.card_paragraph(report)
    _several_models_in_one_pass(tiny_run, report)


def _several_models_in_one_pass(tiny_run, alone):
    """measure_models (the teacher's forwards shared) gives a model the report measure() gave it alone (the CLI's,
    `alone`); the paired comparison of the self-distilled analog (its own teacher: the maps are the identity) against
    a perturbed copy says analog on stitching. Same rows, concepts and budgets as the CLI: no step compiles again."""

    from analogjax.config import load_config
    from analogjax.fidelity.measure_run import live_teacher
    from analogjax.run_dir import load_student

    config = load_config(str(tiny_run / "self.yaml"), [])
    student = load_student(str(tiny_run / "run"), config)
    teacher, teacher_params = live_teacher(config, student.mesh)
    perturbed = _perturbed(student.params, 0.5, seed=7)
    reports = transfer.measure_models(
        config,
        {"analog": student.params, "baseline": perturbed},
        teacher,
        teacher_params,
        student.mesh,
        fit_batches=2,
        eval_batches=1,
        user_concepts=concepts.read_user_concepts(tiny_run / "concepts.jsonl"),
    )
    assert json.dumps(json.loads(json.dumps(reports["analog"])), sort_keys=True) == json.dumps(alone, sort_keys=True)
    _assert_intervals_hold_their_figures(reports["baseline"])
    entries = reports.comparison("analog", "baseline")
    assert [e["measure"].split(" (")[0] for e in entries] == [
        "stitch explained variance analog→teacher",
        "stitch explained variance teacher→analog",
        "stitched KL(teacher‖stitched)",
        "probe recovered",
        "steering recovered",
    ]
    for e in entries:
        assert set(e) >= {"analog", "baseline", "analog_ci95", "baseline_ci95", "difference_ci95", "better"}
        if e["analog"] is not None:
            assert e["analog_ci95"][0] <= e["analog"] <= e["analog_ci95"][1]
    assert [e["better"] for e in entries[:3]] == ["analog"] * 3
    assert entries[0]["higher_is_better"] and not entries[2]["higher_is_better"]
    table = transfer.comparison_table(reports)
    assert "difference [95% interval]" in table and "stitched KL" in table
    assert transfer.comparison_table(entries) == table


def _perturbed(params, scale: float, seed: int):
    """Each leaf plus Gaussian noise of `scale` x its std, in its sharding (NumPy noise: eager JAX ops would each
    compile)."""
    import jax

    rng = np.random.default_rng(seed)

    def noisy(a):
        host = np.asarray(a)
        noise = scale * host.std() * rng.standard_normal(host.shape)
        return jax.device_put((host + noise).astype(host.dtype), a.sharding)

    return jax.tree.map(noisy, params)


def _assert_intervals_hold_their_figures(report):
    rows = [report, *report["stitch"], *report["probes"], *report["steering"]]
    checked = 0
    for row in rows:
        for key, interval in row.items():
            if key.endswith("_ci95") and interval is not None:
                value = row[key[: -len("_ci95")]]
                lo, hi = interval
                assert lo - 1e-9 <= value <= hi + 1e-9, (key, value, interval)
                checked += 1
    assert checked >= 4 * len(report["stitch"]) + 4 * len(report["probes"])


def test_eval_includes_transfer(tiny_run, tmp_path, capsys):
    out = tmp_path / "fidelity"
    assert (
        cli.main(
            ["eval", "--config", str(tiny_run / "self.yaml"), "--checkpoint", str(tiny_run / "run"), "--out", str(out)]
        )
        == 0
    )
    report = json.loads((out / "fidelity.json").read_text())
    assert report["transfer"]["stitch"][0]["explained_variance"] > 0.99
    assert "## Transfer to the teacher" in (out / "fidelity.md").read_text()


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--pairs", "0:5"], "layer pair (0, 5) is outside"),
        (["--pairs", "0-1"], "--pairs: '0-1' is not an analog:teacher layer pair"),
        (["--pairs", "0:0,1:1", "--concept-pair", "0:1"], "is not one of the layer pairs"),
        (["--fit-batches", "400", "--eval-batches", "1"], "transfer fit_batches (--fit-batches): 400 batch(es)"),
        (["--fit-batches", "0"], "--fit-batches must be positive"),
        (["--intervention-batches", "0"], "--intervention-batches must be positive"),
        (
            ["--fit-batches", "1", "--eval-batches", "1", "--intervention-batches", "2"],
            "(--intervention-batches, 2) must not exceed the eval batches (1)",
        ),
    ],
)
def test_bad_layer_pairs_are_one_error_line(tiny_run, tmp_path, capsys, args, fragment):
    assert (
        cli.main(
            [
                "transfer",
                "--config",
                str(tiny_run / "self.yaml"),
                "--checkpoint",
                str(tiny_run / "run"),
                "--out",
                str(tmp_path / "o"),
                *args,
            ]
        )
        == 2
    )
    assert fragment in capsys.readouterr().err


def test_a_user_concept_that_cannot_be_measured_is_an_error(tiny_run, tmp_path, capsys):
    path = tmp_path / "one.jsonl"  # one text: nothing left to measure on
    path.write_text(json.dumps({"concept": "lonely", "text": "x = 1\n", "spans": [[2, 3]]}) + "\n")
    assert (
        cli.main(
            [
                "transfer",
                "--config",
                str(tiny_run / "self.yaml"),
                "--checkpoint",
                str(tiny_run / "run"),
                "--concepts",
                str(path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "concept 'lonely' cannot be measured: no positive tokens in the eval part" in err


def test_unmeasurable_builtin_concepts_are_skipped_with_the_reason_and_user_ones_refused():
    r, s, names = 4, 6, concepts.BUILTIN_CONCEPTS + ("mine",)
    tokens = np.tile(np.arange(s, dtype=np.int32), (r, 1))
    labels = np.zeros((r, s, len(names)), np.int8)
    labels[:, ::2, names.index("digit")] = 1  # measurable: positives and negatives in both parts, marker token
    labels[:, :, names.index("python_string")] = -1  # no Python text at all
    labels[:, 1, names.index("mine")] = 1
    labels[1::2, :, names.index("mine")] = 0  # no positives in the eval part
    rows = concepts.LabelledRows(
        tokens,
        np.ones_like(tokens),
        tokens,
        np.roll(tokens, -1, 1),
        np.ones((r, s), np.float32),
        np.array([True, False] * 2),
        labels,
        np.arange(r),
        names,
        None,
        {"fit": 2, "eval": 2},
    )
    with pytest.raises(UserError, match="concept 'mine' cannot be measured: no positive tokens in the eval part"):
        concepts.measurable(rows, {"mine"})
    labels[:, :, names.index("mine")] = -1
    measured, markers, skipped = concepts.measurable(rows, set())
    assert [names[c] for c in measured] == ["digit"] and markers == [[1, 3, 5]]
    reasons = {s["concept"]: s["reason"] for s in skipped}
    assert reasons["python_string"] == "no held-out document parses as Python"
    assert reasons["python_comment"] == "no positive tokens in the fit part of its texts"


def test_interventions_run_on_the_leading_eval_batches_only(tiny_run):
    """intervention_batches: explained variance, probes and CE measured on every eval row (the same figures as a run
    intervening everywhere), stitched KL and steering on the leading rows only (the same figures as the full run's
    sums cut to those rows); more intervention batches than eval batches is refused."""
    from analogjax.config import load_config
    from analogjax.fidelity.measure_run import live_teacher
    from analogjax.fidelity.transfer_rows import TransferRows, figures
    from analogjax.run_dir import load_student

    config = load_config(str(tiny_run / "self.yaml"), [])
    student = load_student(str(tiny_run / "run"), config)
    teacher, teacher_params = live_teacher(config, student.mesh)
    user = concepts.read_user_concepts(tiny_run / "concepts.jsonl")

    def measured(**budget):
        return transfer.measure_models(
            config,
            {"analog": student.params},
            teacher,
            teacher_params,
            student.mesh,
            fit_batches=2,
            user_concepts=user,
            **budget,
        )

    full, part = measured(eval_batches=2), measured(eval_batches=2, intervention_batches=1)
    a, b = full["analog"], part["analog"]
    gb, heavy = config.data.global_batch, b["intervention_rows"]
    assert (a["eval_rows"], a["intervention_rows"]) == (b["eval_rows"], a["eval_rows"])
    # One held-out batch, and the user concept's texts (run first): their rows are the only ones labelling it.
    assert gb < heavy < b["eval_rows"] and heavy % gb == 0
    assert a["eval_tokens"] == b["eval_tokens"] > b["intervention_tokens"] > 0
    user = [s for s in b["steering"] if s["concept"] == "assignment"]
    assert user and user[0]["recovered"] is not None
    for key in ("teacher_ce", "analog_ce", "probes"):
        assert b[key] == a[key], key
    for sa, sb in zip(a["stitch"], b["stitch"]):
        for key in ("explained_variance", "teacher_to_analog_explained_variance"):
            assert (sb[key], sb[f"{key}_ci95"]) == (sa[key], sa[f"{key}_ci95"])
    # The interventions' figures: those of the full run's per-row sums cut to the leading rows.
    rows = full.rows["analog"]
    cut = TransferRows.from_sums(
        rows.pairs,
        rows.concept_pair,
        rows.concepts,
        {k: v[:heavy] if k.startswith(("stitched_", "steering/")) else v for k, v in rows.sums.items()},
    )
    expected = figures(cut)
    for se, sb in zip(expected["stitch"], b["stitch"]):
        for key in ("stitched_kl", "stitched_ce"):
            assert sb[key] == pytest.approx(se[key], rel=1e-12) and sb[f"{key}_ci95"] == se[f"{key}_ci95"]
    for se, sb in zip(expected["steering"], b["steering"]):
        for key in ("native", "transferred", "random", "recovered"):
            assert (sb[key], sb[f"{key}_ci95"]) == (se[key], se[f"{key}_ci95"]), key
    # The CE to set beside the stitched CE: on the same rows.
    on_heavy = figures(rows.leading(heavy))
    assert (b["teacher_ce_intervened"], b["analog_ce_intervened"]) == (on_heavy["teacher_ce"], on_heavy["analog_ce"])
    assert "teacher_ce_intervened" not in a
    assert f"teacher's {b['teacher_ce_intervened']:.3f}" in transfer.card_paragraph(b)
    assert "on the tokens of the stitched CE" in transfer.markdown_table(b)
    _assert_intervals_hold_their_figures(b)
    # Intervals resample documents; the held-out rows (after the user concept's, whose ids come after every held-out
    # document's) follow round-robin over their documents: every document's first row before any second row.
    documents = rows.sums[intervals.DOCUMENT]
    held = [float(d) for d in documents[documents < documents[0]]]
    firsts = [i for i, d in enumerate(held) if d not in held[:i]]
    again = [i for i, d in enumerate(held) if d in held[:i]]
    assert len(firsts) >= 3 and again and max(firsts) < min(again)
    assert f"({intervals.units(rows.sums)} documents, each resampled with its rows" in b["method"]["intervals"]
    assert f"of which {b['intervention_tokens']:,} also for stitched" in transfer.card_paragraph(b)
    assert "of which" not in transfer.card_paragraph(a)
    with pytest.raises(UserError, match="intervention_batches.*must not exceed the eval batches"):
        measured(eval_batches=2, intervention_batches=3)


def test_each_rows_first_token_the_attention_sink_is_in_no_statistic(tiny_run):
    """The first token of each row is the attention sink (massive activations, arXiv 2402.17762): the maps, probes,
    differences of means, steering norm and every measure leave it out, so the fit and eval token counts are the
    rows' real tokens less one per row; the self-distilled analog (its own teacher) still stitches exactly, the
    stitched forward keeping the teacher's own state at the sink."""
    from analogjax.config import load_config
    from analogjax.fidelity.measure_run import live_teacher
    from analogjax.run_dir import load_student

    config = load_config(str(tiny_run / "self.yaml"), [])
    student = load_student(str(tiny_run / "run"), config)
    teacher, teacher_params = live_teacher(config, student.mesh)
    report = transfer.measure_models(
        config, {"analog": student.params}, teacher, teacher_params, student.mesh, fit_batches=2, eval_batches=1
    )["analog"]
    rows = concepts.rows_for_budgets(config, None, 2, 1)
    real = rows.segment_ids > 0
    assert (real[:, 0]).all() and (rows.positions[:, 0] == 0).all()
    for part, mask in (("fit", rows.fit), ("eval", ~rows.fit)):
        held = real[mask]
        assert report[f"{part}_rows"] == len(held)
        assert report[f"{part}_tokens"] == held.sum() - len(held), part
    for s in report["stitch"]:
        assert s["stitched_kl"] < 1e-3 and s["explained_variance"] > 0.99


def test_fidelity_of_several_students_in_one_pass_is_each_ones_alone(tiny_run):
    """fidelity.measure_models (one teacher step per batch, then one compiled student step per student) gives each
    student the report it gets measured alone; the self-distilled analog (its own teacher) reads KL 0 and CKA 1."""

    from analogjax.config import load_config
    from analogjax.fidelity import metrics
    from analogjax.fidelity.measure_run import live_teacher
    from analogjax.run_dir import load_student

    config = load_config(str(tiny_run / "self.yaml"), [])
    student = load_student(str(tiny_run / "run"), config)
    teacher, teacher_params = live_teacher(config, student.mesh)
    perturbed = _perturbed(student.params, 0.3, seed=3)
    both = metrics.measure_models(
        config, {"analog": student.params, "other": perturbed}, teacher, teacher_params, student.mesh, 2
    )
    for name, params in (("analog", student.params), ("other", perturbed)):
        alone = metrics.measure(config, params, teacher, teacher_params, student.mesh, 2)
        assert both[name]["overall"] == pytest.approx(alone["overall"], rel=1e-6, abs=1e-9), name
        assert [c["cka"] for c in both[name]["cka"]] == pytest.approx([c["cka"] for c in alone["cka"]], rel=1e-6)
    assert both["analog"]["overall"]["forward_kl"] == pytest.approx(0.0, abs=1e-4)
    assert [c["cka"] for c in both["analog"]["cka"]] == pytest.approx([1.0] * len(both["analog"]["cka"]), abs=1e-4)
    assert both["other"]["overall"]["forward_kl"] > 1e-3
