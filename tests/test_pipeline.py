"""End to end at a tiny scale: every stage of the chain, generation, evaluation, and exact GAN resume."""
import json
import math
import shutil

import pytest
import torch

from cpgan.config import load_config
from cpgan.stages import gan as gan_stage
from cpgan.stages.base import run_stages
from cpgan.utils.checkpoint import load_state, load_weights

TINY = ["data.n_train=48", "data.n_test=30", "data.n_test_novel=12", "model.gf_dim=8", "model.df_dim=8",
        "model.r_num=1", "model.image_backbone_width=8", "model.embedding_dim=32", "model.word_dim=16",
        "damsm.epochs=1", "damsm.batch_size=12", "evaluator.steps=4", "evaluator.batch_size=8",
        "detector.steps=3", "detector.batch_size=8", "captioner.steps=3", "captioner.batch_size=8",
        "captioner.embed_dim=16", "captioner.hidden_dim=16", "captioner.att_dim=16",
        "gan.batch_size=6", "gan.steps=4", "gan.sample_every=2", "gan.checkpoint_every=2", "gan.log_every=1",
        "gan.eval_images=12", "evaluate.n_images=30", "evaluate.batch_size=15"]
PLAIN = ["model.text_encoder=plain", "model.image_encoder=grid", "model.cond_disc=global"]


def _cfg(*extra):
    return load_config("shapes-quick", TINY + list(extra))


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("plain") / "run"
    res = run_stages(_cfg(*PLAIN), run_dir)
    return run_dir, res


def test_plain_chain_runs_every_stage(plain_run):
    run_dir, res = plain_run
    for name in ("data", "vocab", "evaluator", "damsm", "gan", "evaluate"):
        assert res[name]["status"] == "done", (name, res[name])
    for name in ("detector", "captioner", "memory"):
        assert res[name]["status"] == "not needed"
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    for split in ("test", "test_novel"):
        gen, real = metrics["splits"][split]["generated"], metrics["splits"][split]["real"]
        for key in ("r_precision_dmgan", "soa_i", "colour_acc", "fid", "inception_score"):
            assert key in gen and key in real, (split, key)
        assert real["fid"] == 0.0 and gen["fid"] > 0.0
    assert (run_dir / "gan" / "samples" / "step_000004.png").exists()
    assert (run_dir / "damsm" / "attention" / "attention.png").exists()
    # a second run reuses every stage
    res2 = run_stages(_cfg(*PLAIN), run_dir)
    assert all(r["status"] in ("skipped", "not needed") for r in res2.values())


def test_generate_and_unknown_words(plain_run, tmp_path, capsys):
    from cpgan.cli import main

    run_dir, _ = plain_run
    out = tmp_path / "g.png"
    assert main(["generate", "a red circle above a blue zorgle", "--run", str(run_dir), "--n", "2", "--stages",
                 "--attention", "--out", str(out)]) == 0
    assert out.exists()
    assert "unknown words dropped: zorgle" in capsys.readouterr().err
    assert main(["generate", "zorgle blorp", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "no known word" in capsys.readouterr().err


@pytest.mark.parametrize("options", [(), ("gan.amp=bf16", "gan.augment=translation,cutout", "model.d_batch_norm=false",
                                          "gan.tiscl_augment=translation")],
                         ids=["paper", "bf16-augment-nobn"])
def test_gan_resume_is_exact(plain_run, tmp_path, monkeypatch, options):
    """N steps, stop (as SIGTERM would), resume to 2N == 2N uninterrupted (weights equal on CPU), also with
    the speed/regularisation options (their randomness is a function of the step, too)."""
    run_dir, _ = plain_run
    cfg = _cfg(*PLAIN, "gan.steps=6", "gan.checkpoint_every=100", *options)
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        shutil.copytree(run_dir, d)
        shutil.rmtree(d / "gan")
        shutil.rmtree(d / "evaluate")
    run_stages(cfg, a, only=["gan"])

    original = gan_stage.Trainer.train_step

    def stopping_step(self, batch, **kw):
        out = original(self, batch, **kw)
        if self.step + 1 == 3:  # the step counter is incremented after train_step returns
            self.ctx._stop[0] = True
        return out

    monkeypatch.setattr(gan_stage.Trainer, "train_step", stopping_step)
    res = run_stages(cfg, b, only=["gan"])
    assert res["gan"]["status"] == "interrupted"
    st = load_state(b / "gan" / "state.safetensors")
    assert st["step"] == 3
    monkeypatch.setattr(gan_stage.Trainer, "train_step", original)
    res = run_stages(cfg, b, only=["gan"])
    assert res["gan"]["status"] == "done" and res["gan"]["steps"] == 6
    ga, _ = load_weights(a / "gan" / "generator.safetensors")
    gb, _ = load_weights(b / "gan" / "generator.safetensors")
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
    sa, sb = load_state(a / "gan" / "state.safetensors"), load_state(b / "gan" / "state.safetensors")
    for k in sa["D"]:
        assert torch.equal(sa["D"][k], sb["D"][k]), k
    assert all(torch.isfinite(v).all() for v in ga.values())
    hist = [json.loads(line) for line in (a / "gan" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(h["g_loss"]) for h in hist if "g_loss" in h)


def test_budget_change_continues_training(plain_run, tmp_path):
    run_dir, _ = plain_run
    d = tmp_path / "c"
    shutil.copytree(run_dir, d)
    res = run_stages(_cfg(*PLAIN, "gan.steps=6"), d, only=["gan"])
    assert res["gan"]["status"] == "done" and res["gan"]["steps"] == 6
    hist = [json.loads(line) for line in (d / "gan" / "metrics.jsonl").read_text().splitlines()]
    steps = [h["step"] for h in hist if "d_loss" in h]
    assert steps[:4] == [1, 2, 3, 4] and steps[-2:] == [5, 6]  # continued, not restarted


def test_full_cpgan_chain(tmp_path):
    """mate + oaie + fgcd: detector, captioner, memory, MATE/OAIE DAMSM, FGCD GAN, evaluation."""
    run_dir = tmp_path / "full"
    res = run_stages(_cfg(), run_dir)
    for name in ("data", "vocab", "evaluator", "detector", "captioner", "memory", "damsm", "gan", "evaluate"):
        assert res[name]["status"] == "done", (name, res[name])
    bank, _ = load_weights(run_dir / "memory" / "memory.safetensors")
    assert bank["bank"].shape[1] == 1024
    metrics = json.loads((run_dir / "evaluate" / "metrics.json").read_text())
    assert "r_precision_dmgan" in metrics["splits"]["test"]["generated"]


def test_demo_trains_the_evaluator_in_a_second_process(tmp_path, monkeypatch, capsys):
    """`cpgan demo` on 2+ cores: the evaluator runs as a child process beside the main chain; the result is the
    same chain (every stage done, report written) and a second call reuses everything."""
    import os

    from cpgan.cli import main

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out)] + [a for kv in TINY + PLAIN for a in ("--set", kv)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "training in a second process" in err
    assert (out / "evaluator.log").exists()
    for name in ("data", "vocab", "evaluator", "damsm", "gan", "evaluate"):
        assert json.loads((out / name / "done.json").read_text())["hash"], name
    assert (out / "report.html").exists()
    assert main(args) == 0
    assert "second process" not in capsys.readouterr().err


def _trainer(plain_run, tmp_path, *options):
    """A GAN Trainer (plain encoders, ``options``) on a copy of the tiny plain run."""
    from cpgan.stages.base import StageContext
    from cpgan.utils.logging import JsonlLogger

    d = tmp_path / "run"
    shutil.copytree(plain_run[0], d)
    ctx = StageContext(run_dir=d, stage="gan", device=torch.device("cpu"), logger=JsonlLogger(tmp_path / "l.jsonl"))
    return gan_stage.Trainer(_cfg(*PLAIN, *options), ctx)


def test_standing_statistics_of_the_ema_generator(plain_run, tmp_path):
    """Before sampling, every BN layer of the EMA generator holds the plain average of its per-batch input
    moments over `gan.standing_batches` batches (checked with hooks), and training is unaffected."""
    tr = _trainer(plain_run, tmp_path, "gan.standing_batches=3")
    bns = [m for m in tr.G_ema.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    seen = {id(m): [] for m in bns}

    def hook(mod, inp):
        x = inp[0].detach().double()
        dims = [0] + list(range(2, x.dim()))
        n = x.numel() / x.shape[1]
        seen[id(mod)].append((x.mean(dims), x.var(dims, unbiased=True), n))

    handles = [m.register_forward_pre_hook(hook) for m in bns]
    params = {k: v.clone() for k, v in tr.G_ema.state_dict().items() if "running" not in k and "num_batches" not in k}
    G = tr.sampling_generator()
    for h in handles:
        h.remove()
    assert G is tr.G_ema and not G.training
    for m in bns:
        rec = seen[id(m)]
        assert len(rec) % 3 == 0 and rec  # a shared module (the residual up-block) runs once per stage
        mean = sum(r[0] for r in rec) / len(rec)
        var = sum(r[1] for r in rec) / len(rec)
        assert torch.allclose(m.running_mean.double(), mean, rtol=1e-4, atol=1e-6)
        assert torch.allclose(m.running_var.double(), var, rtol=1e-4, atol=1e-6)
    for k, v in G.state_dict().items():
        if k in params:
            assert torch.equal(v, params[k]), k


def test_tiscl_sees_the_augmented_generated_image(plain_run, tmp_path, monkeypatch):
    """gan.tiscl_augment: the DAMSM image encoder in TISCL gets the final-stage fake after the policy's transform."""
    tr = _trainer(plain_run, tmp_path, "gan.tiscl_augment=translation", "gan.tiscl_views=1")
    calls, seen = [], []
    real_augment = gan_stage.augment

    def spy_augment(x, policy, gen=None):
        y = real_augment(x, policy, gen)
        calls.append((policy, x, y))
        return y

    real_encode = tr.enc.encode_images
    monkeypatch.setattr(gan_stage, "augment", spy_augment)
    monkeypatch.setattr(tr.enc, "encode_images", lambda x: (seen.append(x), real_encode(x))[1])
    batch = next(iter(gan_stage.make_loader(tr.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    tr.train_step(batch)
    tiscl = [c for c in calls if c[0] == ("translation",)]
    assert len(tiscl) == 1 and len(seen) == 1 and seen[0] is tiscl[0][2]
    x, y = tiscl[0][1], tiscl[0][2]
    assert x.shape[-1] == max(tr.sizes) and not torch.equal(x, y)


def test_independent_damsm_r_precision(plain_run, tmp_path):
    """evaluate.independent_damsm: with the run's own (plain+grid) DAMSM as the 'independent' one, the extra
    R-precision must equal the standard one exactly (same encoders, same negatives); bad folders are refused."""
    from cpgan.stages.base import StageError
    from cpgan.stages.evaluate import evaluate_run

    run_dir, _ = plain_run
    cfg = _cfg(*PLAIN, f"evaluate.independent_damsm={run_dir}", "evaluate.n_images=30")
    res = evaluate_run(cfg, run_dir, torch.device("cpu"), tmp_path / "ev")
    for split in ("test", "test_novel"):
        for kind in ("generated", "real"):
            m = res["splits"][split][kind]
            assert m["r_precision_dmgan_indep"] == pytest.approx(m["r_precision_dmgan"], abs=1e-9), (split, kind)
    with pytest.raises(StageError, match="no finished damsm"):
        evaluate_run(_cfg(*PLAIN, f"evaluate.independent_damsm={tmp_path}"), run_dir, torch.device("cpu"),
                     tmp_path / "ev2")


def _spy_image_grads(tr):
    """Wrap the trainer's generator: record the norm of every gradient that reaches each stage image."""
    seen: dict[int, list[float]] = {}
    real_g = tr.Gw

    def spy(*args):
        fakes, *rest = real_g(*args)
        for i, f in enumerate(fakes):
            f.register_hook(lambda gr, i=i: seen.setdefault(i, []).append(float(gr.float().norm())))
        return (fakes, *rest)

    tr.Gw = spy
    return seen


@pytest.mark.parametrize("zero_adv", [False, True])
def test_gradient_balance_diagnostics(plain_run, tmp_path, monkeypatch, zero_adv):
    """gx_adv{i} / gx_tiscl equal the gradient that reaches each stage image in the real backward pass when
    only that term is present: λ 0 isolates the adversarial terms; a zeroed adversarial loss isolates TISCL."""
    # float32: under bf16 autocast λ·∂TISCL and ∂(λ·TISCL) differ by rounding (~1e-3)
    tr = _trainer(plain_run, tmp_path, "gan.lambda_tiscl=" + ("3" if zero_adv else "0"), "gan.amp=")
    if zero_adv:
        real_hinge = gan_stage.g_hinge_loss
        monkeypatch.setattr(gan_stage, "g_hinge_loss",
                            lambda *a, **k: {**real_hinge(*a, **k), "loss": real_hinge(*a, **k)["loss"] * 0.0})
    seen = _spy_image_grads(tr)
    batch = next(iter(gan_stage.make_loader(tr.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    logs = tr.train_step(batch, diagnose=True)
    n = len(tr.sizes)
    actual = [seen[i][-1] for i in range(n)]  # the last gradient of each image is the optimiser's backward
    if zero_adv:
        assert all(logs[f"gx_adv{i}"] == 0.0 for i in range(n))
        assert logs["gx_tiscl"] > 0 and logs["gx_tiscl"] == pytest.approx(actual[-1], rel=1e-4)
    else:
        assert "gx_tiscl" not in logs
        for i in range(n):
            assert logs[f"gx_adv{i}"] > 0 and logs[f"gx_adv{i}"] == pytest.approx(actual[i], rel=1e-4)
    assert not any(k.startswith("gx_") for k in tr.train_step(batch))  # only on request


@pytest.mark.parametrize("lam", [1e4, 1e-6])
def test_tiscl_balance_caps_lambda(plain_run, tmp_path, lam):
    """gan.tiscl_balance b: λ·TISCL's gradient at the last image is b times the adversarial one when λ is large
    (the cap binds), and λ is left alone when it is small."""
    b = 2.5
    tr = _trainer(plain_run, tmp_path, f"gan.lambda_tiscl={lam}", f"gan.tiscl_balance={b}", "gan.amp=")
    batch = next(iter(gan_stage.make_loader(tr.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    logs = tr.train_step(batch, diagnose=True)
    last = len(tr.sizes) - 1
    if lam > 1:
        assert logs["lambda_tiscl"] < lam
        assert logs["gx_tiscl"] == pytest.approx(b * logs[f"gx_adv{last}"], rel=1e-4)
    else:
        assert logs["lambda_tiscl"] == lam
        assert logs["gx_tiscl"] < b * logs[f"gx_adv{last}"]
    assert gan_stage.balanced_weight(10.0, 2.0, 1.0, 4.0) == 0.5
    assert gan_stage.balanced_weight(10.0, 2.0, 1.0, 0.0) == 10.0


def test_tiscl_hard_negatives_add_to_the_loss(plain_run, tmp_path):
    """gan.tiscl_hard_negatives: the same first step (same fakes) has a larger TISCL with the swapped captions in
    each image's softmax; the DAMSM summary reports how often real images prefer their caption to a swap."""
    batch = next(iter(gan_stage.make_loader(_trainer(plain_run, tmp_path / "a").ds, 4, seed=0, start_step=0,
                                            num_workers=0, rank=0, world=1)))
    base = _trainer(plain_run, tmp_path / "b").train_step(batch)["tiscl"]
    hard = _trainer(plain_run, tmp_path / "c", "gan.tiscl_hard_negatives=shape,colour").train_step(batch)["tiscl"]
    assert hard > base
    with pytest.raises(ValueError, match="gan.tiscl_hard_negatives: unknown kind"):
        _trainer(plain_run, tmp_path / "d", "gan.tiscl_hard_negatives=size")
    summary = plain_run[1]["damsm"]
    for kind in ("shape", "colour"):
        for level in ("word", "sentence"):
            assert 0.0 <= summary[f"swap_{kind}_{level}"] <= 1.0


def _damsm_batch(run_dir):
    """The plain run's trained DAMSM encoders, its config and vocabulary, and a batch of 8 training pairs."""
    from cpgan import build
    from cpgan.data.dataset import CaptionDataset, collate, load_split, load_vocab
    from cpgan.stages.damsm import make_encoders

    cfg = _cfg(*PLAIN)
    vocab = load_vocab(run_dir)
    te, ie = build.load_damsm(cfg, run_dir, len(vocab), "cpu")
    enc = make_encoders(cfg, run_dir, len(vocab), torch.device("cpu"), te, ie)
    ds = CaptionDataset(load_split(run_dir, "train"), [cfg.data.image_size], cfg.damsm.words_num, train=False)
    return cfg, vocab, enc, collate([ds[i] for i in range(8)])


def test_damsm_hard_negatives_batch_loss(plain_run):
    """damsm.hard_negatives: the DAMSM training loss of a batch gains the swapped captions' terms (image->caption
    only), and the swaps come from the global RNG (same seed, same loss)."""
    from cpgan.negatives import make_swapper
    from cpgan.stages.damsm import batch_loss

    cfg, vocab, enc, batch = _damsm_batch(plain_run[0])
    sw = make_swapper("shape,colour", "damsm.hard_negatives", vocab.word2id, "shapes")
    with torch.no_grad():
        plain = batch_loss(enc, batch, "train", torch.device("cpu"), cfg.damsm)
        torch.manual_seed(3)
        hard = batch_loss(enc, batch, "train", torch.device("cpu"), cfg.damsm, sw)
        torch.manual_seed(3)
        again = batch_loss(enc, batch, "train", torch.device("cpu"), cfg.damsm, sw)
    assert hard["w_loss0"] > plain["w_loss0"] and hard["s_loss0"] > plain["s_loss0"]
    assert hard["w_loss1"] == plain["w_loss1"] and hard["s_loss1"] == plain["s_loss1"]
    assert again["loss"] == hard["loss"]


def test_damsm_augment_batch_loss(plain_run):
    """damsm.augment: the training loss of a batch is the DAMSM loss of the images augmented with the global RNG's
    draws — recomputed here by hand (noise added directly, region features of the clean images) — and differs
    from the clean loss."""
    from cpgan.losses import damsm_loss
    from cpgan.stages.damsm import batch_loss

    cfg, _, enc, batch = _damsm_batch(plain_run[0])
    d = cfg.damsm
    with torch.no_grad():
        plain = batch_loss(enc, batch, "train", torch.device("cpu"), d)
        torch.manual_seed(5)
        noisy = batch_loss(enc, batch, "train", torch.device("cpu"), d, policy=("noise:0.3",))
        torch.manual_seed(5)
        x = batch["images"][-1] + 0.3 * torch.randn(batch["images"][-1].shape)
        f = enc.encode_images(x, "train", batch["index"])
        words, sent = enc.encode_text(batch["captions"], batch["lengths"])
        cls = batch["class_ids"] if bool((batch["class_ids"] >= 0).all()) else None  # -1 = no class (AttnGAN)
        ref = damsm_loss(f.regions, f.global_features, words, sent, batch["lengths"], class_ids=cls,
                         region_mask=f.region_mask, gamma1=d.gamma1, gamma2=d.gamma2, gamma3=d.gamma3)
    torch.testing.assert_close(noisy["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    assert abs(float(noisy["loss"]) - float(plain["loss"])) > 1e-3


def test_d_hard_negatives_feed_swapped_own_captions(plain_run, tmp_path):
    """gan.d_hard_negatives=shape: the captions encoded for D's mismatched term are the batch's own captions with
    exactly one shape word changed to another shape (same length); without it, another image's captions."""
    from cpgan.data.shapes import SHAPE_OF

    def spy(tr):
        seen = []
        real = tr._text
        tr._text = lambda c, l: (seen.append((c.clone(), l.clone())), real(c, l))[1]
        return seen

    tr = _trainer(plain_run, tmp_path / "a", "gan.d_hard_negatives=shape")
    batch = next(iter(gan_stage.make_loader(tr.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    seen = spy(tr)
    tr.train_step(batch)
    (caps, lens), (wcaps, wlens) = seen[0], seen[-1]
    assert torch.equal(wlens, lens)
    words = tr.vocab.id2word
    for b in range(caps.shape[0]):
        a, w = caps[b, :lens[b]], wcaps[b, :lens[b]]
        assert torch.all(wcaps[b, lens[b]:] == 0)
        diff = (a != w).nonzero().flatten().tolist()
        assert len(diff) == 1
        old, new = words[int(a[diff[0]])], words[int(w[diff[0]])]
        assert SHAPE_OF[old] != SHAPE_OF[new]
    plain = _trainer(plain_run, tmp_path / "b")
    seen = spy(plain)
    plain.train_step(batch)
    assert torch.equal(seen[-1][0], batch["wrong_captions"])
    with pytest.raises(ValueError, match="one kind with one negative"):
        _trainer(plain_run, tmp_path / "c", "gan.d_hard_negatives=shape,colour")


def _first_step_by_hand(tr, batch):
    """The step's per-step generator after G's draws, the text features and the stage images that
    ``tr.train_step(batch)`` will produce (the same noise and G)."""
    cfg = tr.cfg
    B = batch["captions"].shape[0]
    gen = gan_stage.step_generator(cfg.gan.seed, tr.step)
    z = gan_stage.truncated_noise(B, cfg.model.z_dim, None, generator=gen)
    eps = torch.randn(B, cfg.model.condition_dim, generator=gen)
    with torch.no_grad():
        words, sent, mask = tr._text(batch["captions"], batch["lengths"])
        fakes = tr.G(z, sent, words, mask, eps)[0]
    return gen, words, sent, fakes


def test_tiscl_on_every_stage(plain_run, tmp_path):
    """gan.tiscl_stages=all: the first step's G loss is the paper's plus λ times the DAMSM loss of the first
    stage's image resized to the last stage's size (recomputed here from the same noise and G)."""
    from cpgan.losses import damsm_loss

    opts = ("gan.amp=", "gan.tiscl_augment=", "gan.tiscl_views=1", "gan.tiscl_hard_negatives=",
            "gan.lambda_tiscl=3.0")
    last = _trainer(plain_run, tmp_path / "a", *opts)
    every = _trainer(plain_run, tmp_path / "b", *opts, "gan.tiscl_stages=all")
    assert every.tiscl_stage_ids == [0, 1] and last.tiscl_stage_ids == [1]
    batch = next(iter(gan_stage.make_loader(last.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    # the first stage's image as the step will draw it, and its TISCL by hand
    cfg = every.cfg
    lens = batch["lengths"]
    _, words, sent, fakes = _first_step_by_hand(every, batch)
    with torch.no_grad():
        up = torch.nn.functional.interpolate(fakes[0], size=fakes[1].shape[-2:], mode="bilinear", align_corners=False)
        f = every.enc.encode_images(up)
        ref = damsm_loss(f.regions, f.global_features, words, sent, lens,
                         class_ids=batch["class_ids"] if bool((batch["class_ids"] >= 0).all()) else None,
                         region_mask=f.region_mask, gamma1=cfg.damsm.gamma1, gamma2=cfg.damsm.gamma2,
                         gamma3=cfg.damsm.gamma3)["loss"]
    a, b = last.train_step(batch), every.train_step(batch)
    assert b["tiscl"] == pytest.approx(a["tiscl"], rel=1e-5)  # the last stage's term is unchanged
    assert b["g_loss"] == pytest.approx(a["g_loss"] + 3.0 * b["tiscl0"], rel=1e-5)
    assert b["tiscl0"] == pytest.approx(float(ref), rel=1e-4)
    with pytest.raises(ValueError, match="gan.tiscl_stages"):
        _trainer(plain_run, tmp_path / "c", "gan.tiscl_stages=first")


def test_tiscl_averages_augmented_views(plain_run, tmp_path):
    """gan.tiscl_views=3: TISCL is the mean of the DAMSM losses of three translated views of the final fake,
    each encoded on its own here (the step encodes them as one batch) with the step's random draws."""
    from cpgan.diffaug import augment
    from cpgan.losses import damsm_loss

    opts = ("gan.amp=", "gan.tiscl_augment=translation", "gan.tiscl_hard_negatives=", "gan.lambda_tiscl=2.0")
    tr = _trainer(plain_run, tmp_path / "a", *opts, "gan.tiscl_views=3")
    batch = next(iter(gan_stage.make_loader(tr.ds, 4, seed=0, start_step=0, num_workers=0, rank=0, world=1)))
    cfg, lens = tr.cfg, batch["lengths"]
    gen, words, sent, fakes = _first_step_by_hand(tr, batch)
    cls = batch["class_ids"] if bool((batch["class_ids"] >= 0).all()) else None
    fake = fakes[-1]
    with torch.no_grad():
        views = [augment(fake, ("translation",), gen) for _ in range(3)]
        losses = []
        for v in views:
            f = tr.enc.encode_images(v)
            losses.append(float(damsm_loss(f.regions, f.global_features, words, sent, lens, class_ids=cls,
                                           region_mask=f.region_mask, gamma1=cfg.damsm.gamma1,
                                           gamma2=cfg.damsm.gamma2, gamma3=cfg.damsm.gamma3)["loss"]))
    assert not torch.equal(views[0], views[1])
    logs = tr.train_step(batch)
    # the views' losses differ by ~1e-4 relative at this untrained G; batched vs one-by-one agree to ~1e-8
    assert max(losses) - min(losses) > 1e-4
    assert logs["tiscl"] == pytest.approx(sum(losses) / 3, rel=2e-6)
    assert logs["g_loss"] == pytest.approx(logs["g_adv"] + logs["kl"] * cfg.gan.kl_weight + 2.0 * logs["tiscl"],
                                           rel=1e-5)
    with pytest.raises(ValueError, match="gan.tiscl_views must be at least 1"):
        _trainer(plain_run, tmp_path / "b", *opts, "gan.tiscl_views=0")
    with pytest.raises(ValueError, match="needs a random gan.tiscl_augment"):
        _trainer(plain_run, tmp_path / "c", "gan.tiscl_views=2", "gan.tiscl_augment=")
