"""Model families as the training loop sees them: losses, steps, state, shard cache (no Ray)."""

import copy

import numpy as np
import pytest
import torch
from conftest import REPO

from t2i import config as config_lib
from t2i.data.dataset import load_manifest, load_vocabulary, read_split_arrays, to_float
from t2i.data.feed import ShardCache, eval_caption_rows
from t2i.evaluation.evaluate import shapes_accuracy
from t2i.models.blocks import bounded_logvar
from t2i.models.vae import VAEOutput
from t2i.training import checkpoint as ckpt_lib
from t2i.training.encoders import EncoderRecipe, mirror_ids, train_dual_encoder
from t2i.training.families import GANFamily, make_family
from t2i.training.losses import (
    alignment_loss,
    discriminator_hinge_loss,
    elbo_loss,
    gaussian_kl,
    kl_weight,
    matching_aware_gradient_penalty,
    mode_seeking_loss,
    other_image_rows,
    pooled_alignment_loss,
)
from t2i.training.optim import extend_schedule, make_optimizer
from t2i.training.spectrum import SpectrumTracker, power_weights, ring_weights

TINY_GAN = ["model.width=8", "model.hidden=32", "model.latent_dim=8", "loss.align_weight=0"]


def family_for(config_file, vectors, *overrides):
    cfg = config_lib.load(REPO / "t2i" / "configs" / config_file, list(overrides))
    family = make_family(cfg, vectors)
    family.wrap(lambda net: net)  # no DDP outside Ray Train
    return family


def fixed_batch(shapes_dir, n=16):
    manifest = load_manifest(shapes_dir)
    data = read_split_arrays(shapes_dir, manifest, "train")
    first = np.unique(data["caption_image"], return_index=True)[1][:n]
    return to_float(data["images"][:n]), torch.as_tensor(data["word_ids"][first]).long()


def test_gaussian_kl_matches_torch_distributions():
    torch.manual_seed(0)
    mu, logvar, pmu, plogvar = (torch.randn(5, 3) for _ in range(4))
    q = torch.distributions.Normal(mu, (0.5 * logvar).exp())
    p = torch.distributions.Normal(pmu, (0.5 * plogvar).exp())
    assert torch.allclose(gaussian_kl(mu, logvar, pmu, plogvar), torch.distributions.kl_divergence(q, p), atol=1e-5)
    assert kl_weight(2.0, 4, 1.0) == pytest.approx(0.5) and kl_weight(2.0, 0, 0.0) == 2.0


def test_log_variance_is_bounded_so_the_kl_stays_finite():
    # A posterior log-variance of 1e4 must not make the KL overflow.
    raw = torch.tensor([-1e4, -3.0, 0.0, 2.0, 1e4])
    bounded = bounded_logvar(raw)
    assert bounded.min() >= -8.0 and bounded.max() <= 4.0
    assert torch.allclose(bounded[1:4], raw[1:4], atol=0.35)  # near-identity where models live
    zeros = torch.zeros(1, 5)
    kl = elbo_loss(VAEOutput(torch.zeros(1, 3, 2, 2), zeros, bounded[None], zeros, zeros), torch.zeros(1, 3, 2, 2))["kl"]
    assert torch.isfinite(kl) and kl < 100


def test_plain_elbo_ignores_beta_warm_up_and_free_bits():
    torch.manual_seed(0)
    recon, image = torch.rand(4, 3, 8, 8), torch.rand(4, 3, 8, 8)
    mu, logvar = torch.randn(4, 5), torch.randn(4, 5)
    zeros = torch.zeros(4, 5)
    plain = elbo_loss(VAEOutput(recon, mu, logvar, zeros, zeros), image)
    weighted = elbo_loss(VAEOutput(recon, mu, logvar, zeros, zeros), image, beta=0.1, free_bits=2.0)
    assert plain["loss"].item() == pytest.approx(plain["elbo"].item())
    assert weighted["elbo"].item() == pytest.approx(plain["elbo"].item())
    assert weighted["loss"].item() != pytest.approx(plain["loss"].item())
    expected = (recon - image).pow(2).flatten(1).sum(1).mean() + gaussian_kl(mu, logvar, zeros, zeros).sum(1).mean()
    assert plain["elbo"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_bernoulli_likelihood_is_binary_cross_entropy():
    image = torch.tensor([[[[0.0, 1.0]]]])
    recon = torch.tensor([[[[0.25, 0.5]]]])
    zeros = torch.zeros(1, 2)
    terms = elbo_loss(VAEOutput(recon, zeros, zeros, zeros, zeros), image, likelihood="bernoulli")
    assert terms["loss"].item() == pytest.approx(-np.log(0.75) - np.log(0.5), rel=1e-5)
    assert terms["mse"].item() == pytest.approx((0.25 ** 2 + 0.5 ** 2) / 2)


def test_cvae_first_epoch_kl_stays_sane(shapes_dir):
    """Warm-up from weight 0 (the Flickr8k case): a few hundred steps keep the KL finite and small."""
    vocab = load_vocabulary(shapes_dir)
    family = family_for("cvae.toml", vocab.vectors, "model.width=8", "model.hidden=64", "model.latent_dim=8",
                        "loss.kl_warmup_epochs=2", "optim.lr=0.003")
    images, word_ids = fixed_batch(shapes_dir, 32)
    kls = [family.train_step(images, word_ids, epoch_progress=0.0)["kl"].item() for _ in range(60)]
    assert all(np.isfinite(kls)) and max(kls) < 1e3


def test_default_shapes_family_learns_colour_fast(shapes_dir):
    """The default config's loss terms are wired right: a few hundred steps on the tiny shapes
    set draw the named colour far above chance (1/8), read from the pixels."""
    torch.manual_seed(0)
    manifest, vocab = load_manifest(shapes_dir), load_vocabulary(shapes_dir)
    family = family_for("shapes.toml", vocab.vectors, "model.width=8", "model.hidden=64", "data.batch_size=32")
    train = read_split_arrays(shapes_dir, manifest, "train")
    images, ids, owner = to_float(train["images"]), torch.as_tensor(train["word_ids"]).long(), train["caption_image"]
    rng = np.random.default_rng(0)
    for step in range(250):
        rows = rng.integers(0, len(ids), 32)
        family.train_step(images[owner[rows]], ids[rows], epoch_progress=step / 15)
    test = read_split_arrays(shapes_dir, manifest, "test", attributes=True)
    family.train(False)
    drawn = family.generator.sample(torch.as_tensor(test["word_ids"]).long(), deterministic=True)[:, 0]
    accuracy = shapes_accuracy(drawn, test["attributes"], test["caption_image"])
    assert accuracy["color"] > 0.5, accuracy


@pytest.mark.parametrize("block", ["plain", "residual"])
def test_discriminator_and_generator_losses_move_the_right_way(shapes_dir, block):
    torch.manual_seed(0)
    vocab = load_vocabulary(shapes_dir)
    family = family_for("gan.toml", vocab.vectors, *TINY_GAN, f"model.block={block}")
    images, word_ids = fixed_batch(shapes_dir)
    with torch.no_grad():
        fake = family.model(word_ids)[0]
    d_losses = [family.discriminator_step(images, word_ids, fake)["d_loss"].item() for _ in range(15)]
    assert d_losses[-1] < d_losses[0] - 0.3, d_losses  # D learns to tell real+matching from the rest
    g_losses = []
    for _ in range(15):
        fake, mu, logvar = family.model(word_ids)
        g_losses.append(family.generator_step(word_ids, fake, mu, logvar)["g_adv"].item())
    assert g_losses[-1] < g_losses[0], g_losses  # G learns to fool that (fixed) D


def test_the_step_runs_each_network_as_dfgan_does(shapes_dir):
    """One generator pass per step; D's trunk sees B real + B fake images in the D step (the
    real features also serve the mismatched pairs) and B in the G step, which leaves D's
    gradients alone."""
    vocab = load_vocabulary(shapes_dir)
    family = family_for("gan.toml", vocab.vectors, *TINY_GAN)
    family.wrap(lambda net: net)
    images, word_ids = fixed_batch(shapes_dir, 8)
    calls = {"generator": 0, "trunk": []}
    critic, generator_forward, trunk = family.discriminator, family.model.forward, family.discriminator.image.forward

    def count_generator(*args, **kwargs):
        calls["generator"] += 1
        return generator_forward(*args, **kwargs)

    def count_trunk(x):
        calls["trunk"].append(len(x))
        return trunk(x)

    family.model.forward, critic.image.forward = count_generator, count_trunk
    seen = {}
    forward = critic.forward

    def spy(real, fake, ids, other_image):
        seen.update(ids=ids, other_image=other_image)
        return forward(real, fake, ids, other_image)

    critic.forward = spy
    after_d_step = []
    generator_step = family.generator_step

    def snapshot_then_step(*args):
        after_d_step.extend(p.grad.clone() for p in critic.parameters())
        return generator_step(*args)

    family.generator_step = snapshot_then_step
    family.train_step(images, word_ids, epoch_progress=0.0)
    assert calls["generator"] == 1 and calls["trunk"] == [16, 8]
    assert torch.equal(seen["ids"], word_ids)
    assert torch.equal(seen["other_image"], torch.roll(torch.arange(8), -1))  # DF-GAN's roll of the real features
    assert all(torch.equal(p.grad, g) for p, g in zip(critic.parameters(), after_d_step))  # G step: none for D
    assert all(p.requires_grad for p in critic.parameters())  # unfrozen again after the G step


def test_hinge_and_matching_aware_gradient_penalty():
    # The hinge terms: a D that scores everything 0 pays 1 on each term, 2 in total.
    terms = discriminator_hinge_loss(torch.zeros(4), torch.zeros(4), torch.zeros(4))
    assert terms["d_loss"].item() == pytest.approx(2.0)
    # MA-GP is zero-centred on the joint (image, sentence) gradient: k * ||grad||^p.
    sentence = torch.ones(2, 3, requires_grad=True)
    images = torch.zeros(2, 1, 1, 1, requires_grad=True)
    logits = images.flatten(1).sum(1) + 2 * sentence.sum(1)
    penalty = matching_aware_gradient_penalty(logits, images, sentence, k=2.0, p=6.0)
    assert penalty.item() == pytest.approx(2.0 * (1 + 3 * 4) ** 3)  # ||(1, 2, 2, 2)||^6 = 13^3


def test_gan_checkpoint_round_trip_restores_both_networks_and_optimizers(shapes_dir, tmp_path):
    torch.manual_seed(0)
    vocab = load_vocabulary(shapes_dir)
    family = family_for("gan.toml", vocab.vectors, *TINY_GAN, "optim.ema_decay=0.999")
    images, word_ids = fixed_batch(shapes_dir, 8)
    for _ in range(2):
        family.train_step(images, word_ids, epoch_progress=0.0)
    path = ckpt_lib.save(tmp_path, model=family.generator, cfg=family.cfg, vocab=vocab, epoch=4, metrics={},
                         training=family.state_dict())
    state = ckpt_lib.read_state(path)
    restored = make_family(family.cfg, vocab.vectors)
    restored.load_networks(state)
    restored.wrap(lambda net: net)
    restored.load_training_state(state)
    for name in ("model", "discriminator"):
        a, b = family.networks()[name].state_dict(), restored.networks()[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
        saved, loaded = family.optimizers[name].state_dict(), restored.optimizers[name].state_dict()
        assert saved["param_groups"][0]["lr"] == loaded["param_groups"][0]["lr"]
        assert all(torch.equal(saved["state"][i]["exp_avg"], loaded["state"][i]["exp_avg"]) for i in saved["state"])
    # model.pt's generator is the weights' moving average (with optim.ema_decay > 0):
    # what generate/evaluate/serve load; the trained weights resume from the training state.
    assert family.cfg.optim.ema_decay > 0 and family.generator is family.ema
    average, trained = family.generator.state_dict(), family.networks()["model"].state_dict()
    assert any(not torch.equal(average[k], trained[k]) for k in average if average[k].is_floating_point())
    assert all(torch.equal(average[k], v) for k, v in restored.generator.state_dict().items())
    loaded = ckpt_lib.load(path)
    assert all(torch.equal(average[k], v) for k, v in loaded.model.state_dict().items())
    assert loaded.model.sample(word_ids[:2], n=3).shape == (2, 3, 3, 64, 64)
    assert isinstance(family, GANFamily)
    # One more step moves the average by (1 - decay) of the way to the trained weights.
    before = {k: v.clone() for k, v in family.generator.state_dict().items()}
    family.train_step(images, word_ids, epoch_progress=0.0)
    decay = family.cfg.optim.ema_decay
    name, weight = next((n, w) for n, w in family.networks()["model"].named_parameters() if w.dim() > 1)
    expected = decay * before[name] + (1 - decay) * weight.detach()
    assert torch.allclose(family.generator.state_dict()[name], expected, atol=1e-6)


def test_shard_cache_order_is_seeded_and_drops_the_partial_batch():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 2, 2, 3).contiguous()
    captions = torch.arange(30).view(30, 1)  # image i owns caption rows 3i, 3i+1, 3i+2
    cache = ShardCache(images, captions, np.arange(0, 31, 3), keys=np.arange(10, dtype=np.uint64))

    def epoch(seed, number, rank=0):
        return [(b["image"][:, 0, 0, 0].tolist(), b["word_ids"][:, 0].tolist())
                for b in cache.epoch_batches(4, seed, number, rank)]

    first = epoch(0, 0)
    assert len(first) == 2 and all(len(imgs) == 4 for imgs, _ in first)  # 10 rows -> 2 full batches
    assert first == epoch(0, 0)  # the same seed sees the same batches
    assert first != epoch(0, 1) and first != epoch(1, 0) and first != epoch(0, 0, rank=1)
    for imgs, caps in first:
        assert all(c // 3 == i for i, c in zip(imgs, caps))  # each caption belongs to its image


def test_evaluation_scores_every_image_with_captions_in_turn():
    offsets = np.array([10, 15, 20, 22, 27])  # four images with 5, 5, 2 and 5 caption rows
    assert eval_caption_rows(offsets, 0).tolist() == list(range(10, 27))  # all of them
    assert eval_caption_rows(offsets, 1).tolist() == [10, 16, 20, 25]  # image i: its caption i mod count
    assert eval_caption_rows(offsets, 2).tolist() == [10, 11, 16, 17, 20, 21, 25, 26]
    assert sorted(eval_caption_rows(offsets, 9).tolist()) == list(range(10, 27))  # capped at each count


def test_all_captions_pairs_each_image_with_its_own_captions(shapes_dir):
    import pyarrow.parquet as pq

    from t2i.data.dataset import decode_images, shard_paths
    from t2i.data.feed import all_captions

    manifest = load_manifest(shapes_dir)
    table = pq.read_table(shard_paths(shapes_dir, manifest, "dev")[0], columns=["image", "word_ids"])
    images = decode_images(table.column("image"), 64)
    captions = table.column("word_ids").to_pylist()
    every, one = all_captions(table, 64), all_captions(table, 64, per_image=1)
    assert len(every["image"]) == sum(len(c) for c in captions) and len(one["image"]) == len(images)
    for i, (image, ids) in enumerate(zip(one["image"], one["word_ids"])):
        assert np.array_equal(image, images[i]) and ids.tolist() == captions[i][i % len(captions[i])]


def test_train_cache_is_the_same_whatever_order_the_files_arrive_in(shapes_dir):
    """Ray Data shuffles the files of the train split: the cache sorts them back by image id,
    so one seed gives the same batches in every run."""
    import pyarrow.parquet as pq

    from t2i.data.dataset import shard_paths

    tables = [pq.read_table(p, columns=["image", "word_ids", "image_id"])
              for p in shard_paths(shapes_dir, load_manifest(shapes_dir), "train")]
    assert len(tables) >= 2
    forward = ShardCache.from_train_tables(tables, 64, "cpu")
    backward = ShardCache.from_train_tables(tables[::-1], 64, "cpu")
    assert torch.equal(forward.images, backward.images) and torch.equal(forward.captions, backward.captions)
    assert np.array_equal(forward.offsets, backward.offsets) and np.array_equal(forward.keys, backward.keys)
    first = [b["word_ids"] for b in forward.epoch_batches(16, 0, 0, 0)]
    again = [b["word_ids"] for b in backward.epoch_batches(16, 0, 0, 0)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_a_resumed_cosine_schedule_follows_the_raised_epoch_count():
    """A 4-epoch cosine run resumed with train.epochs = 8 continues on the 8-epoch cosine
    (not from ~0 back up to the peak, as the restored 4-epoch state would)."""
    weight = torch.nn.Parameter(torch.zeros(1))

    def schedule(epochs):
        optimizer = torch.optim.Adam([weight], lr=1.0)
        return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)

    def lrs(optimizer, scheduler, steps):
        out = []
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
            out.append(optimizer.param_groups[0]["lr"])
        return out

    short_opt, short = schedule(4)
    lrs(short_opt, short, 4)
    resumed_opt, resumed = schedule(8)
    resumed_opt.load_state_dict(short_opt.state_dict())
    resumed.load_state_dict(short.state_dict())
    extend_schedule(resumed, 8)
    fresh_opt, fresh = schedule(8)
    expected = lrs(fresh_opt, fresh, 8)
    assert resumed_opt.param_groups[0]["lr"] == pytest.approx(expected[3])
    assert lrs(resumed_opt, resumed, 4) == pytest.approx(expected[4:])


def test_adam_is_fused_and_a_loaded_state_continues_exactly():
    """t2i's Adam runs PyTorch's fused kernel; its state, as read back from a checkpoint,
    resumes with the same moments and steps and continues as the original would have."""
    torch.manual_seed(0)
    grads = [torch.randn(5, 3) for _ in range(6)]

    def stepped(optimizer, weight, batch):
        for grad in batch:
            weight.grad = grad.clone()
            optimizer.step()

    cfg = config_lib.OptimConfig(name="adam", lr=0.1)
    old_weight = torch.nn.Parameter(torch.ones(5, 3))
    old = make_optimizer([old_weight], cfg)
    stepped(old, old_weight, grads[:3])
    new_weight = torch.nn.Parameter(old_weight.detach().clone())
    resumed = make_optimizer([new_weight], cfg)
    assert resumed.defaults["fused"] is True
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as read from a checkpoint: not shared
    assert resumed.param_groups[0]["fused"] is True
    assert int(resumed.state[new_weight]["step"]) == 3
    stepped(old, old_weight, grads[3:])
    stepped(resumed, new_weight, grads[3:])
    torch.testing.assert_close(new_weight, old_weight)


def test_alignment_loss_pulls_generated_images_toward_their_own_captions(shapes_dir):
    """The gan's DAMSM-style term: a frozen encoder (not the judge) whose InfoNCE loss on
    (generated image, caption) pairs falls as the generator trains on it alone."""
    torch.manual_seed(0)
    vocab = load_vocabulary(shapes_dir)
    manifest = load_manifest(shapes_dir)
    data = read_split_arrays(shapes_dir, manifest, "train")
    encoder = train_dual_encoder(data["images"], data["word_ids"], data["caption_image"], vocab.vectors,
                                 mirror_ids(vocab.words), recipe=EncoderRecipe(epochs=4, batch=32), width=8,
                                 log=lambda line: None)
    cfg = config_lib.load(REPO / "t2i" / "configs" / "gan.toml",
                          [*TINY_GAN, "loss.align_weight=10.0", "loss.align_augment=translation,cutout"])
    with pytest.raises(ValueError, match="alignment-loss encoder"):
        make_family(cfg, vocab.vectors)
    frozen = encoder.requires_grad_(False).eval()
    before = {k: v.clone() for k, v in frozen.state_dict().items()}
    family = make_family(cfg, vocab.vectors, frozen)
    family.wrap(lambda net: net)
    family.optimizers["model"].param_groups[0]["lr"] = 2e-3
    _, word_ids = fixed_batch(shapes_dir, 16)
    with torch.no_grad():
        family.generator.train(False)
        images = family.generator.sample(word_ids, n=1, deterministic=True)[:, 0]
    start = alignment_loss(frozen, images, word_ids).item()
    terms = [family.generator_step(word_ids, *family.model(word_ids))["align"].item() for _ in range(25)]
    assert terms[0] == pytest.approx(start, abs=1.0)  # the step reports the loss it trains on
    assert np.mean(terms[-5:]) < np.mean(terms[:5]) - 0.1, terms
    assert all(torch.equal(before[k], v) for k, v in frozen.state_dict().items())  # never trained here
    # loss.align_augment: a new random view of the same images each step; without it, one view.
    assert family._alignment(images, word_ids).item() != family._alignment(images, word_ids).item()
    family.align_augment = ()
    assert family._alignment(images, word_ids).item() == family._alignment(images, word_ids).item()
    with pytest.raises(config_lib.ConfigError, match="align_weight"):
        config_lib.load(REPO / "t2i" / "configs" / "cvae.toml", ["loss.align_weight=1.0"])


def test_mode_seeking_term_pushes_two_draws_of_a_caption_apart(shapes_dir, monkeypatch):
    """MSGAN's term: large when two draws of one caption coincide, and stepping G on it moves
    them apart; the family draws a quarter of the batch twice only when its weight is on."""
    same = torch.full((2, 3, 4, 4), 0.5)
    assert mode_seeking_loss(same, same).item() > 1e4
    assert mode_seeking_loss(same, same + 0.5).item() == pytest.approx(2.0, rel=1e-3)
    torch.manual_seed(0)
    vocab = load_vocabulary(shapes_dir)
    images, word_ids = fixed_batch(shapes_dir, 16)
    for weight, drawn in ((0.0, 16), (5.0, 20)):
        family = family_for("gan.toml", vocab.vectors, *TINY_GAN, f"loss.mode_seeking_weight={weight}")
        sizes = []
        generate = family.model.forward
        monkeypatch.setattr(family.model, "forward",
                            lambda ids, generate=generate, sizes=sizes: sizes.append(len(ids)) or generate(ids))
        terms = family.train_step(images, word_ids, 0.0)
        assert sizes == [drawn] and (terms["mode_seeking"].item() > 0) == (weight > 0)
    family.optimizers["model"].param_groups[0]["lr"] = 2e-3
    gaps = []
    for _ in range(15):
        fake, mu, logvar = family.model(torch.cat([word_ids, word_ids[:4]]))
        gaps.append(1 / family.generator_step(word_ids, fake[:16], mu[:16], logvar[:16], fake[16:])["mode_seeking"].item())
    assert np.mean(gaps[-3:]) > np.mean(gaps[:3]), gaps  # mean |draw 1 - draw 2| grew
    with pytest.raises(config_lib.ConfigError, match="mode_seeking_weight: gan-family"):
        config_lib.load(REPO / "t2i" / "configs" / "cvae.toml", ["loss.mode_seeking_weight=1.0"])
    with pytest.raises(config_lib.ConfigError, match="mode_seeking_weight must be >= 0"):
        config_lib.load(REPO / "t2i" / "configs" / "gan.toml", ["loss.mode_seeking_weight=-1"])


def test_spectrum_term_tracks_the_gap_and_pulls_the_draws_toward_the_real_spectrum(shapes_dir):
    """Durall et al.'s term, against running spectra: zero for one spectrum, large for a
    checkerboard (an upsampling grid's power at one frequency); stepping G on it brings the
    draws' spectrum toward the real batch's; its spectra resume with the run; the family adds
    it only when its weight is on."""
    torch.manual_seed(0)
    vocab = load_vocabulary(shapes_dir)
    images, word_ids = fixed_batch(shapes_dir, 16)
    assert SpectrumTracker(64)(images, images).item() == pytest.approx(0.0, abs=1e-9)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2
    gridded = (images + 0.2 * checker).clamp(0, 1)
    assert SpectrumTracker(64)(gridded, images).item() > 10 * SpectrumTracker(64)(images.flip(3), images).item()
    for weight in (0.0, 5.0):
        family = family_for("gan.toml", vocab.vectors, *TINY_GAN, f"loss.spectrum_weight={weight}")
        terms = family.train_step(images, word_ids, 0.0)
        assert (terms["spectrum"].item() > 0) == (weight > 0) and ("spectra" in family.state_dict()) == (weight > 0)
    family.spectra.momentum = 0.5
    family.optimizers["model"].param_groups[0]["lr"] = 2e-3
    gaps = []
    for _ in range(15):
        fake, mu, logvar = family.model(word_ids)
        gaps.append(family.generator_step(word_ids, fake, mu, logvar, real=images)["spectrum"].item())
    assert np.mean(gaps[-3:]) < 0.5 * np.mean(gaps[:3]), gaps
    resumed = family_for("gan.toml", vocab.vectors, *TINY_GAN, "loss.spectrum_weight=5")
    resumed.load_networks({"model": family.model.state_dict(), "training": family.state_dict()})
    assert torch.equal(resumed.spectra.fake, family.spectra.fake) and resumed.spectra.steps == 16
    with pytest.raises(config_lib.ConfigError, match="spectrum_weight: gan-family"):
        config_lib.load(REPO / "t2i" / "configs" / "cvae.toml", ["loss.spectrum_weight=1.0"])
    with pytest.raises(config_lib.ConfigError, match="spectrum_weight must be >= 0"):
        config_lib.load(REPO / "t2i" / "configs" / "gan.toml", ["loss.spectrum_weight=-1"])


def weighted_over_plain(shapes_dir, weighting: str) -> dict[str, float]:
    """The spectral term under ``weighting`` over the plain mean's, for two excesses added to a
    shapes batch: large-scale contrast (a (1, 1) band, a handful of the 4,096 frequencies) and
    a checkerboard at the highest frequency (an upsampling grid's)."""
    images, _ = fixed_batch(shapes_dir, 16)
    images = 0.1 + 0.8 * images  # room for the added patterns without clipping (which spreads them)
    ramp = torch.arange(64.0)
    excesses = {"banded": images + 0.1 * torch.cos(2 * torch.pi * (ramp[:, None] + ramp[None, :]) / 64),
                "checker": images + 0.1 * ((ramp[:, None] + ramp[None, :]) % 2)}
    return {name: SpectrumTracker(64, weighting=weighting)(excess, images).item()
            / SpectrumTracker(64)(excess, images).item() for name, excess in excesses.items()}


def test_ring_weighting_weighs_the_largest_scales_as_durall_s_radial_average_does(shapes_dir):
    """Weights 1 / |f| (mean 1, none at the zero frequency): an excess of large-scale contrast,
    a handful of the 4,096 frequencies, counts for several times more than under a plain mean;
    a checkerboard at the highest frequency for less. The weights are not saved, so runs from
    before them resume."""
    weights = ring_weights(64)
    assert weights.mean().item() == pytest.approx(1.0) and weights[32, 32] == 0
    assert weights[32, 33] > weights[32, 34] > weights[32, 40] > weights[32, 0] > 0
    ratios = weighted_over_plain(shapes_dir, "ring")
    assert ratios["banded"] > 5 and ratios["checker"] < 1, ratios
    assert "weights" not in SpectrumTracker(64, weighting="ring").state_dict()
    with pytest.raises(config_lib.ConfigError, match="spectrum_weighting must be one of"):
        config_lib.load(REPO / "t2i" / "configs" / "gan.toml", ["loss.spectrum_weighting=radial"])


def test_power_weighting_lets_the_largest_scales_pull_as_hard_as_the_finest(shapes_dir):
    """Weights 1 + the photos' power share: an excess of large-scale contrast counts for far more
    than under a plain mean (its log-gap alone barely moves pixels there), a checkerboard at the
    highest frequency about as much; the weights follow the tracked real spectrum, unsaved."""
    ratios = weighted_over_plain(shapes_dir, "power")
    assert ratios["banded"] > 20 and 0.9 < ratios["checker"] < 1.5, ratios
    images, _ = fixed_batch(shapes_dir, 16)
    tracker = SpectrumTracker(64, weighting="power")
    tracker(images, images)
    weights = power_weights(tracker.real)
    assert weights.mean().item() == pytest.approx(2.0) and weights.min() >= 1.0
    assert weights[32, 33] > 10 * weights[32, 63]
    assert set(tracker.state_dict()) == {"real", "fake", "steps"}
    config_lib.load(REPO / "t2i" / "configs" / "gan.toml", ["loss.spectrum_weighting=power"])


def test_state_digest_sees_any_change_but_not_memory_layout():
    torch.manual_seed(0)
    net = torch.nn.Conv2d(3, 4, 3)
    optimizer = torch.optim.Adam(net.parameters())
    net(torch.rand(2, 3, 8, 8)).sum().backward()
    optimizer.step()
    state = {"model": net.state_dict(), "training": {"optimizers": {"model": optimizer.state_dict()}}}
    digest = ckpt_lib.state_digest(state)
    layout = {"model": {k: v.to(memory_format=torch.channels_last) if v.dim() == 4 else v
                        for k, v in net.state_dict().items()}, "training": state["training"]}
    assert ckpt_lib.state_digest(layout) == digest
    moved = {"model": state["model"], "training": {"optimizers": {"model": {**optimizer.state_dict(),
             "param_groups": [{**optimizer.state_dict()["param_groups"][0], "lr": 0.5}]}}}}
    assert ckpt_lib.state_digest(moved) != digest  # a learning rate
    optimizer.state_dict()["state"][0]["exp_avg"].add_(1e-6)
    assert ckpt_lib.state_digest(state) != digest  # one moment estimate


@pytest.mark.parametrize("schedule", ["constant", "exponential", "plateau", "cosine"])
def test_every_schedule_continues_across_a_resume_as_if_never_stopped(schedule):
    """Two epochs, a checkpoint, a fresh family restored from it, three more epochs: the
    learning rates equal those of five uninterrupted epochs (plateau fed the same metric)."""
    cfg = config_lib.load(None, [f"optim.schedule={schedule}", "optim.gamma=0.5", "optim.patience=0",
                                 "train.epochs=5", "model.width=8", "model.hidden=16", "model.latent_dim=4"])
    vectors = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    metrics = [1.0, 1.0, 0.9, 0.9, 0.9]  # the plateau decays where it stalls

    def family():
        f = make_family(cfg, vectors)
        f.wrap(lambda net: net)
        return f

    def run(f, epochs):
        out = []
        for metric in epochs:
            f.optimizers["model"].step()
            f.end_epoch(metric)
            out.append(f.lr)
        return out

    straight = run(family(), metrics)
    first = family()
    before = run(first, metrics[:2])
    state = {"model": first.generator.state_dict(), "training": first.state_dict()}
    resumed = family()
    resumed.load_networks(state)
    resumed.wrap(lambda net: net)
    resumed.load_training_state(state)
    assert before + run(resumed, metrics[2:]) == pytest.approx(straight)
    if schedule != "constant":
        assert len(set(straight)) > 1  # the schedule really moved


def test_free_bits_make_small_kl_dims_free():
    """Free bits (Kingma et al. 2016): each latent dim's batch-mean KL below the floor is
    charged at the floor, so the optimiser gains nothing by shrinking it further."""
    recon = image = torch.zeros(2, 3, 2, 2)
    mu = torch.tensor([[0.1, 3.0], [0.1, 3.0]])  # dim 0: KL 0.005 nats, dim 1: 4.5 nats
    zeros = torch.zeros(2, 2)
    terms = elbo_loss(VAEOutput(recon, mu, zeros, zeros, zeros), image, free_bits=1.0)
    assert terms["loss"].item() == pytest.approx(1.0 + 4.5)
    assert terms["kl"].item() == pytest.approx(0.005 + 4.5)  # the reported KL stays the true one
    assert kl_weight(1.0, 2, 0.5) == pytest.approx(0.25) and kl_weight(1.0, 2, 5.0) == 1.0


def test_epoch_means_are_exact_over_uneven_batches():
    from t2i.training.loop import add_terms, means, term_sums

    sums = term_sums(("loss", "mse"), "cpu")
    add_terms(sums, ("loss", "mse"), {"loss": torch.tensor(1.0), "mse": torch.tensor(0.1)}, 3)
    add_terms(sums, ("loss", "mse"), {"loss": torch.tensor(3.0), "mse": torch.tensor(0.5)}, 1)
    result = means("dev", ("loss", "mse"), sums)
    assert result == pytest.approx({"dev_loss": 1.5, "dev_mse": 0.2})  # (3*1 + 1*3) / 4, not (1 + 3) / 2


def test_r_precision_on_hand_made_embeddings():
    """Ten items whose caption embedding equals their image embedding: every item finds its
    own caption (1.0); pointing away from it, no item does (0.0)."""
    from t2i.evaluation.judges import r_precision

    class Fixed:
        def __init__(self, images, texts):
            self.images, self.texts = images, texts

        def eval(self):
            return self

        def embed_images(self, x):
            return self.images[x[:, 0, 0, 0].long()]

        def embed_text(self, ids):
            return self.texts[ids[:, 0]]

    n = 10
    basis = torch.eye(n)
    images = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 3, 2, 2)
    ids = np.arange(n)[:, None]
    owner = np.arange(n)
    right = r_precision(Fixed(basis, basis), images, ids, owner, n_candidates=5, bins=2)
    wrong = r_precision(Fixed(basis, -basis), images, ids, owner, n_candidates=5, bins=2)
    assert right["r_precision"] == 1.0 and wrong["r_precision"] == 0.0 and right["chance"] == pytest.approx(0.2)
    # A judge that scores every caption alike ranks nothing first: ties are misses.
    assert r_precision(Fixed(basis, torch.ones(n, n)), images, ids, owner, n_candidates=5, bins=2)["r_precision"] == 0.0
    # Captions of another image with the true caption's exact text are never distractors:
    # images 0-4 look alike and share one caption text, so each would tie with the other
    # four (a miss) if they could be its distractors.
    same_text = np.array([0, 0, 0, 0, 0, 5, 6, 7, 8, 9])
    alike = Fixed(basis[same_text], basis)
    assert r_precision(alike, images, same_text[:, None], owner, n_candidates=5, bins=2)["r_precision"] == 1.0
    # Too few eligible captions for 99 distractors: chance comes from the pools drawn (1/10 here).
    assert r_precision(Fixed(basis, basis), images, ids, owner)["chance"] == pytest.approx(0.1)


def test_distractors_are_drawn_without_replacement_from_other_images_and_texts():
    from t2i.evaluation.judges import distractor_pools

    rng = np.random.default_rng(0)
    owner = np.repeat(np.arange(60), 5)                      # 5 captions per image
    ids = rng.integers(1, 40, size=(300, 6))
    ids[1] = ids[7]                                          # caption 1 (image 0) reads as caption 7 (image 1)
    for i, pool in enumerate(distractor_pools(ids, owner, 100, rng)):
        assert len(pool) == 99 and len(set(pool.tolist())) == 99
        assert (owner[pool] != owner[i]).all()
        assert not any((ids[j] == ids[i]).all() for j in pool)


def test_flip_augmentation_mirrors_left_and_right_in_the_caption():
    words = ["<pad>", "a", "circle", "left", "top", "right"]
    mapping = mirror_ids(words)
    assert [words[j] for j in mapping] == ["<pad>", "a", "circle", "right", "top", "left"]
    assert mirror_ids(["<pad>", "left", "dog"]) is None      # no "right" to swap with: never flip


def test_mismatched_pairs_never_show_the_captions_own_image():
    """An evaluation batch holds each image's captions side by side ([A A A B B C]): a roll
    by one would pair A's caption with A; every caption must meet another image."""
    image_of = torch.tensor([0, 0, 0, 1, 1, 2])
    images = torch.rand(3, 3, 8, 8)[image_of]
    other = other_image_rows(images)
    assert (image_of[other] != image_of).all(), other
    assert torch.equal(other_image_rows(torch.rand(5, 3, 8, 8)), torch.roll(torch.arange(5), -1))
    one_image = torch.rand(1, 3, 8, 8).expand(4, -1, -1, -1)  # nothing else to pick: the plain roll
    assert torch.equal(other_image_rows(one_image), torch.roll(torch.arange(4), -1))


def test_dev_alignment_scores_each_pair_against_a_fixed_pool(shapes_dir):
    """dev_align's value for a pair does not depend on what else is in its batch, and a
    distractor reading exactly like the true caption is left out."""
    vocab = load_vocabulary(shapes_dir)
    data = read_split_arrays(shapes_dir, load_manifest(shapes_dir), "train")
    encoder = train_dual_encoder(data["images"], data["word_ids"], data["caption_image"], vocab.vectors, None,
                                 recipe=EncoderRecipe(epochs=1, batch=32), seed=0, width=8, log=lambda _: None)
    encoder.requires_grad_(False)
    images, word_ids = fixed_batch(shapes_dir, 12)
    pool = word_ids[6:]
    whole = torch.stack([pooled_alignment_loss(encoder, images[i:i + 1], word_ids[i:i + 1], pool) for i in range(6)])
    assert torch.allclose(pooled_alignment_loss(encoder, images[:6], word_ids[:6], pool), whole.mean(), atol=1e-6)
    assert torch.allclose(pooled_alignment_loss(encoder, images[:3], word_ids[:3], pool), whole[:3].mean(), atol=1e-6)
    # The true caption among the pool itself: it is not its own distractor (finite, >= 0).
    own = pooled_alignment_loss(encoder, images[6:7], word_ids[6:7], pool)
    assert torch.isfinite(own) and own >= 0


def test_the_judge_is_another_network_from_the_alignment_loss_encoder(shapes_dir):
    """Architecture, width and seed all differ: a generator trained against one encoder
    learns features a twin of it would read (TISE), so the judge must not be its twin."""
    from t2i.training import encoders

    judge, loss_encoder = encoders.JUDGE, encoders.ALIGNMENT_LOSS
    assert (judge.tower, judge.width, judge.seed) != (loss_encoder.tower, loss_encoder.width, loss_encoder.seed)
    assert judge.tower != loss_encoder.tower and judge.width != loss_encoder.width and judge.seed != loss_encoder.seed
    vectors = load_vocabulary(shapes_dir).vectors
    depth = {role: sum(isinstance(m, torch.nn.Conv2d) for m in encoders.build(role, vectors).image.modules())
             for role in (judge, loss_encoder)}
    assert depth[judge] == 8 and depth[loss_encoder] == 4
    # The judge's shifts move the pixels, edges replicated; a shift of 0 is the identity.
    images = torch.rand(2, 3, 8, 8)
    assert encoders.shift_images(images, 0, np.random.default_rng(0)) is images
    rng = np.random.default_rng(1)
    draws = [encoders.shift_images(images, 2, rng) for _ in range(5)]
    assert all(d.shape == images.shape for d in draws) and any(not torch.equal(d, images) for d in draws)


def high_frequency_share(images: torch.Tensor) -> float:
    """The share of the images' mean power spectrum in the upper half of frequencies."""
    from t2i.evaluation.distribution import log_power_spectrum

    power = 10 ** log_power_spectrum(images)
    side = power.shape[0]
    offsets = (torch.arange(side) - side // 2).abs()
    ring = torch.maximum(offsets[:, None], offsets[None, :]) >= side // 4
    return float(power[ring].sum() / power.sum())


def test_bilinear_upsampling_leaves_the_decoder_less_high_frequency_power_than_nearest():
    """Nearest upsampling copies the coarse map's spectrum to high frequencies (the grid the
    spectrum check measures); bilinear filters the copies. Same weights, same inputs."""
    from t2i.models.blocks import ModulatedDecoder

    high_share = {}
    for mode in ("nearest", "bilinear", "lanczos"):
        torch.manual_seed(0)
        decoder = ModulatedDecoder(32, 16, config_lib.ModelConfig(decoder="modulated", width=8, upsample=mode)).eval()
        torch.manual_seed(1)
        with torch.no_grad():
            high_share[mode] = high_frequency_share(decoder(torch.randn(64, 32), torch.randn(64, 16)))
    assert high_share["bilinear"] < 0.5 * high_share["nearest"], high_share
    assert high_share["lanczos"] < 0.5 * high_share["nearest"], high_share


def test_reflect_padding_leaves_the_decoder_no_image_edge_to_draw_on():
    """A map the same everywhere stays the same everywhere through a decoder block that pads by
    reflection (and filters with edges replicated); zero padding marks the border, the position
    a filtered generator drew frames on."""
    from t2i.models.blocks import ModulatedUpBlock

    flat = torch.randn(2, 8, 1, 1).expand(-1, -1, 8, 8)
    cond = torch.randn(2, 4)
    spread = {}
    for upsample in ("nearest", "lanczos"):
        for padding in ("zeros", "reflect"):
            torch.manual_seed(0)
            block = ModulatedUpBlock(8, 6, 4, upsample, padding).eval()
            with torch.no_grad():
                out = block(flat, cond)
            spread[upsample, padding] = float((out - out[:, :, 8:9, 8:9]).abs().max())
    assert spread["lanczos", "reflect"] < 1e-5 and spread["nearest", "reflect"] < 1e-5, spread
    assert spread["lanczos", "zeros"] > 1e-2 and spread["nearest", "zeros"] > 1e-2, spread


def test_lanczos_upsampling_keeps_the_pass_band_and_removes_the_copies():
    """A cosine of f cycles across a 32-pixel map, upsampled x2 (along either axis): its own
    frequency keeps its amplitude (bilinear's falls) and its copy at 32 - f, nearest's grid,
    is nearly gone. Same phase as bilinear (align_corners=False); a constant stays constant."""
    from t2i.models.resampling import upsample2x

    side = 32
    for f in (4, 8):
        wave = torch.cos(2 * torch.pi * f * torch.arange(side) / side)
        for other_axis, image in ((-2, wave.repeat(side, 1)), (-1, wave[:, None].repeat(1, side))):
            amplitude = {}
            for mode in ("nearest", "bilinear", "lanczos"):
                line = upsample2x(image[None, None], mode)[0, 0].select(other_axis, 5)  # along the wave
                spectrum = torch.fft.fft(line).abs() / side
                amplitude[mode] = (float(spectrum[f]), float(spectrum[side - f]))
            (own, copy), (bilinear_own, _), (_, nearest_copy) = amplitude["lanczos"], amplitude["bilinear"], amplitude["nearest"]
            assert abs(own - 1) < 0.01 and own > bilinear_own + 0.05, amplitude
            assert copy < 0.015 and nearest_copy > 0.19, amplitude
    ramp = torch.linspace(0, 1, 16).repeat(16, 1)[None, None]
    bilinear = torch.nn.functional.interpolate(ramp, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample2x(ramp, "lanczos")[..., 4:-4], bilinear[..., 4:-4], atol=5e-3)
    constant = upsample2x(torch.full((2, 3, 4, 4), 0.3), "lanczos")
    assert constant.shape == (2, 3, 8, 8) and torch.allclose(constant, torch.full_like(constant, 0.3), atol=1e-6)


def test_a_filtered_leaky_relu_folds_less_of_its_harmonics_back_into_the_map():
    """A sine of 9 cycles across 32 pixels through LeakyReLU: its 2nd harmonic (18 cycles) lies
    past the map's Nyquist frequency (16) and folds back to 14; the 4th (36) to 4. Made at twice
    the rate and low-passed (StyleGAN3's filtered nonlinearity) a tenth of it comes back or
    less, the sine itself keeps its power, and the block keeps its shapes and the identity on
    positives (a constant stays the same)."""
    from t2i.models.blocks import ModulatedUpBlock, ResidualUpBlock
    from t2i.models.resampling import leaky_relu

    side, f = 32, 9
    wave = torch.sin(2 * torch.pi * f * torch.arange(side) / side).repeat(side, 1)[None, None]
    share = {}
    for filtered in (False, True):
        power = torch.fft.rfft(leaky_relu(wave, filtered)[0, 0, 7]).abs() ** 2
        share[filtered] = (float(power[f]), float(power[side - 2 * f] / power[f]), float(power[4 * f - side] / power[f]))
    (plain_own, plain_h2, plain_h4), (own, h2, h4) = share[False], share[True]
    assert plain_h2 > 0.05 and h2 < 0.15 * plain_h2 and h4 < 0.1 * plain_h4, share
    assert abs(own / plain_own - 1) < 0.05, share
    constant = torch.full((2, 3, 8, 8), 0.3)
    assert torch.allclose(leaky_relu(constant, True), constant, atol=1e-6)
    cond = torch.randn(2, 4)
    for block in (ModulatedUpBlock(8, 6, 4, "lanczos", "reflect", filtered=True),
                  ResidualUpBlock(8, 6, 4, "lanczos", "reflect", filtered=True)):
        assert block(torch.randn(2, 8, 8, 8), cond).shape == (2, 6, 16, 16)


def test_pixel_noise_gives_a_filtered_generator_fine_detail_that_its_seed_fixes():
    """StyleGAN's noise inputs: white noise of variance strength^2 per pixel, none for the mean
    draw (z = 0), the same image for the same seed (sample_from_noise and serving stay
    reproducible), and a strength that learns LR_GAIN times faster than the weights."""
    from t2i.evaluation.distribution import log_power_spectrum
    from t2i.models.blocks import PixelNoise
    from t2i.models.gan import GANGenerator

    torch.manual_seed(0)
    noise = PixelNoise(64, 3, 32, initial=1.0)
    flat = torch.zeros(256, 3, 32, 32)
    source = torch.randn(256, 64)
    step = torch.optim.Adam(noise.parameters(), lr=1e-3)
    noise(flat, source).sum().backward()
    step.step()
    assert torch.allclose(noise.strength, torch.full((3,), 1.0 - PixelNoise.LR_GAIN * 1e-3), atol=1e-6)
    with torch.no_grad():
        noise.scaled_strength.fill_(1.0 / PixelNoise.LR_GAIN)
    images = noise(flat, source).detach()
    assert abs(float(images.var()) - 1) < 0.1 and torch.equal(noise(flat, torch.zeros(256, 64)), flat)
    power = log_power_spectrum(0.5 + images[:, :1].expand(-1, 3, -1, -1) / 8)
    not_zero_frequency = torch.ones_like(power, dtype=torch.bool)
    not_zero_frequency[16, 16] = False  # fftshift puts it at the centre; each image's mean is removed
    assert float(power[not_zero_frequency].std()) < 0.1, "the noise image is white: the same power at every frequency"

    def basis_spectrum_spread(layer: PixelNoise) -> float:  # of E_z |N(f)|^2, z ~ N(0, 1), in decades
        return float(torch.log10(torch.fft.fft2(layer.basis.view(64, 32, 32)).abs().pow(2).sum(0)).std())

    assert basis_spectrum_spread(noise) > 0.03  # the fixed speckle a basis of Gaussian draws keeps
    flat = PixelNoise(64, 3, 32, basis="flat")
    assert basis_spectrum_spread(flat) < 1e-4, "the same power at every frequency, exactly"
    assert abs(float(flat(torch.zeros(256, 3, 32, 32), source).var()) / 0.01 - 1) < 0.1  # strength 0.1
    with pytest.raises(config_lib.ConfigError, match="noise inputs, which are off"):
        config_lib.load("gan", ["model.pixel_noise=false", "model.noise_basis=flat"])
    # Turned off on the command line, the noise takes the config file's shape of it (a learned
    # spectrum in `gan`) along, and the run's saved config loads again.
    quiet = config_lib.load("gan", ["model.pixel_noise=false"])
    assert quiet.model.noise_spectrum == "fixed" and config_lib.from_dict(quiet.to_dict()) == quiet

    cfg = config_lib.load("gan", ["model.upsample=lanczos", "model.padding=reflect", "model.pixel_noise=true",
                                  "model.width=4", "model.hidden=16", "model.latent_dim=8"])
    generator = GANGenerator(cfg.model, 20, 6).eval()
    words = torch.randint(1, 20, (64, 5))
    high_share = {}
    for strength in (0.0, 1.0):
        for block in generator.decoder.blocks:
            block.noise.scaled_strength.data.fill_(strength / block.noise.LR_GAIN)
        draws = generator.sample(words, 1, generator=torch.Generator().manual_seed(3))[:, 0]
        assert torch.equal(draws, generator.sample(words, 1, generator=torch.Generator().manual_seed(3))[:, 0])
        high_share[strength] = high_frequency_share(draws)
    assert high_share[1.0] > 2 * high_share[0.0], high_share


def noise_as_images(noise: torch.Tensor) -> torch.Tensor:
    """(N, 1, H, W) noise of variance ~1 -> (N, 3, H, W) grey images inside [0, 1]."""
    return (0.5 + noise / 8).expand(-1, 3, -1, -1)


def spectral_gap(noise: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """|log10 P - log10 P_target| per frequency in decades, the zero frequency (each image's mean,
    removed: no power) left out."""
    from t2i.training.spectrum import mean_power_spectrum

    with torch.no_grad():
        gap = (mean_power_spectrum(noise_as_images(noise)).log10()
               - mean_power_spectrum(noise_as_images(target)).log10()).abs()
    centre = (gap.shape[0] // 2) * gap.shape[1] + gap.shape[1] // 2  # fftshift puts the zero frequency there
    return gap.flatten()[torch.arange(gap.numel()) != centre]


def test_a_learned_noise_spectrum_starts_white_and_the_spectral_term_shapes_it():
    """``spectrum="learned"``: a gain per frequency on the noise image, 1 at the start (the same
    noise as the fixed layer's), mean power kept at 1, and free enough that Durall et al.'s term
    alone fits it to an oriented spectrum no 3x3 kernel could follow."""
    from t2i.models.blocks import PixelNoise
    from t2i.training.spectrum import SpectrumTracker

    torch.manual_seed(0)
    fixed = PixelNoise(64, 1, 32, initial=1.0, basis="flat")
    learned = PixelNoise(64, 1, 32, initial=1.0, basis="flat", spectrum="learned")
    missing = learned.load_state_dict(fixed.state_dict(), strict=False).missing_keys
    assert missing == ["scaled_log_gain"] and "scaled_log_gain" not in fixed.state_dict()
    blank, source = torch.zeros(256, 1, 32, 32), torch.randn(256, 64)
    assert torch.allclose(learned(blank, source), fixed(blank, source), atol=1e-5), "starts white"

    fy, fx = torch.meshgrid(torch.fft.fftfreq(32), torch.fft.rfftfreq(32), indexing="ij")
    oriented = torch.where(fy * fx > 0, 2.0, 0.5)  # amplitude: one diagonal up, the other down
    target = torch.fft.irfft2(torch.fft.rfft2(fixed(blank, source).detach()) * oriented, s=(32, 32))
    target = target / target.std()  # the learned gain keeps the noise's power, so the target has the same

    def gap() -> float:  # mean over frequencies, in decades
        return float(spectral_gap(learned(blank, source), target).mean())

    before = gap()
    tracker = SpectrumTracker(32, momentum=0.2)
    step = torch.optim.Adam([learned.scaled_log_gain], lr=1e-3)
    for _ in range(150):
        step.zero_grad()
        tracker(noise_as_images(learned(blank, source)), noise_as_images(target)).backward()
        step.step()
    assert before > 0.4 and gap() < 0.1 * before, (before, gap())
    assert abs(float(learned(blank, source).detach().var()) - 1) < 0.1, "the strengths keep the scale"
    with pytest.raises(config_lib.ConfigError, match="noise_spectrum shapes the noise inputs, which are off"):
        config_lib.load("gan", ["model.pixel_noise=false", "model.noise_spectrum=learned"])


def test_outlier_weights_trade_the_mean_spectral_gap_for_the_largest_one():
    """``loss.spectrum_outlier_gap``: a 3x3 filter over white noise cannot draw a narrow peak in the
    target spectrum; under the plain squared gap it fits the broad rest and leaves the peak's
    deficit, re-weighted by 1 + (gap / scale)^2 it gives up some of the rest to close the peak."""
    from t2i.training.spectrum import SpectrumTracker, outlier_weights

    assert torch.allclose(outlier_weights(torch.tensor([0.0, 0.05, -0.3]), 0.1), torch.tensor([1.0, 1.25, 10.0]))
    torch.manual_seed(0)
    white = torch.randn(128, 1, 32, 32)
    fy, fx = torch.meshgrid(torch.fft.fftfreq(32) * 32, torch.fft.rfftfreq(32) * 32, indexing="ij")
    shape = (1.0 + (fx / 16) ** 2) * torch.where((fy.abs() <= 1) & ((fx - 8).abs() <= 1), 3.0, 1.0)
    target = torch.fft.irfft2(torch.fft.rfft2(white[:, 0]) * shape, s=(32, 32))[:, None]

    def fit(outlier_gap: float) -> torch.Tensor:  # |gap| per frequency after the fit, in decades
        torch.manual_seed(1)
        conv = torch.nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
        tracker = SpectrumTracker(32, momentum=1.0, outlier_gap=outlier_gap)
        step = torch.optim.Adam(conv.parameters(), lr=0.02)
        for _ in range(300):
            step.zero_grad()
            tracker(noise_as_images(conv(white)), noise_as_images(target)).backward()
            step.step()
        return spectral_gap(conv(white), target)

    plain, outlier = fit(0.0), fit(0.1)
    assert float(outlier.max()) < float(plain.max()) - 0.03, (float(outlier.max()), float(plain.max()))
    assert float(outlier.mean()) >= float(plain.mean()) - 0.005, "the rest pays for it"


def test_a_windowed_spectral_term_sees_the_seam_the_plain_one_cannot(shapes_dir):
    """``loss.spectrum_window``: rolling photos by half their size moves their edges' jump into
    the middle. The periodic FFT's power is unchanged (a shift changes only phases), so the plain
    term is blind to that seam; through a Hann window it is the interior's own power and the
    term sees it. The windowed view reads the grid check's windowed statistic exactly; "both"
    is the sum of the two; a plain tracker's state keeps the names earlier runs saved."""
    from t2i.evaluation.distribution import log_power_spectrum
    from t2i.training.spectrum import EPS, SpectrumTracker

    images, _ = fixed_batch(shapes_dir, 16)
    photos = images * 0.5 + 0.5 * torch.linspace(0, 1, 64)[:, None]  # a vertical ramp: top and bottom differ
    seamed = torch.roll(photos, (32, 32), (2, 3))
    plain, windowed, both = (SpectrumTracker(64, window=w) for w in ("none", "hann", "both"))
    terms = {name: tracker(seamed, photos).item() for name, tracker in
             (("plain", plain), ("windowed", windowed), ("both", both))}
    assert terms["plain"] < 1e-5 and terms["windowed"] > 1e-3, terms  # the plain one: float32 rounding only
    assert terms["both"] == pytest.approx(terms["plain"] + terms["windowed"], rel=1e-4)
    gap = torch.log10(windowed.windowed_fake + EPS) - torch.log10(windowed.windowed_real + EPS)
    check = log_power_spectrum(seamed, windowed=True) - log_power_spectrum(photos, windowed=True)
    assert torch.allclose(gap, check, atol=1e-3), "the term reads the windowed grid check's statistic"
    assert sorted(plain.state_dict()) == ["fake", "real", "steps"]
    assert sorted(both.state_dict()) == ["fake", "real", "steps", "windowed_fake", "windowed_real"]
    with pytest.raises(config_lib.ConfigError, match="spectrum_window must be one of"):
        config_lib.load("gan", ["loss.spectrum_window=tukey"])
    with pytest.raises(config_lib.ConfigError, match="spectrum_window: gan-family"):
        config_lib.load(REPO / "t2i" / "configs" / "cvae.toml", ["loss.spectrum_window=hann"])


def fit_gain_against_a_push(push_mask: torch.Tensor, push_steps: int = 400, steps: int = 400,
                            **tracker_options) -> tuple[SpectrumTracker, torch.Tensor]:
    """A gain per frequency on white noise fits the same noise's spectrum through the tracker's
    term, while another term pushes for more power where ``push_mask`` (32 x 17, rfft layout) is
    set for the first ``push_steps`` (as the alignment and mode-seeking terms push texture). ->
    (the tracker, |the gap| left per frequency in decades, as :func:`spectral_gap`)."""
    torch.manual_seed(0)
    white = torch.randn(64, 1, 32, 32)
    log_gain = torch.zeros(32, 17, requires_grad=True)
    tracker = SpectrumTracker(32, momentum=0.2, **tracker_options)
    step = torch.optim.SGD([log_gain], lr=20.0)
    for i in range(steps):
        step.zero_grad()
        draws = torch.fft.irfft2(torch.fft.rfft2(white[:, 0]) * log_gain.exp(), s=(32, 32))[:, None]
        push = -0.1 * (log_gain * push_mask).mean() * (i < push_steps)
        (tracker(noise_as_images(draws), noise_as_images(white)) + push).backward()
        step.step()
    return tracker, spectral_gap(draws.detach(), white)


def rfft_frequencies() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.meshgrid(torch.fft.fftfreq(32) * 32, torch.fft.rfftfreq(32) * 32, indexing="ij")


def test_integral_control_closes_a_spectral_gap_another_term_holds_up():
    """``loss.spectrum_integral``: the proportional pull settles where it balances the push and
    the band's excess persists; with the integral it grows until the excess is gone. The
    integral is state (saved and resumed) only when it is on."""
    fy, fx = rfft_frequencies()
    band = ((fy.abs() <= 2) & (fx >= 4) & (fx <= 8)).float()
    (plain, held), (integral, closed) = fit_gain_against_a_push(band), fit_gain_against_a_push(band, integral_rate=0.01)
    held, closed = float(held.max()), float(closed.max())
    assert held > 0.04 and closed < 0.1 * held, (held, closed)
    assert sorted(plain.state_dict()) == ["fake", "real", "steps"]
    assert sorted(integral.state_dict()) == ["fake", "integral", "real", "steps"]
    assert float(integral.integral[16, 16 + 6]) > 0.01, "it pulls the band's power down"  # (fy, fx) = (0, 6), centred
    with pytest.raises(config_lib.ConfigError, match="spectrum_integral must be >= 0"):
        config_lib.load("gan", ["loss.spectrum_integral=-0.01"])
    with pytest.raises(config_lib.ConfigError, match="spectrum_integral: gan-family"):
        config_lib.load(REPO / "t2i" / "configs" / "cvae.toml", ["loss.spectrum_integral=0.01"])


def test_a_limited_integral_closes_a_small_gap_and_overshoots_less_after_a_long_deficit():
    """``loss.spectrum_integral_limit``: the integral is bounded to the pull of a gap that many
    decades. A push the term cannot answer for a while (as early in training) winds an unbounded
    integral up, and once the push is gone it overshoots; bounded, it overshoots less, and a
    push small enough to be held within the bound is still closed."""
    fy, fx = rfft_frequencies()
    band = ((fy.abs() <= 2) & (fx >= 4) & (fx <= 8)).float()
    _, small = fit_gain_against_a_push(band, integral_rate=0.01, integral_limit=0.1)
    assert float(small.max()) < 0.005, float(small.max())
    overshoot = {}
    for limit in (0.0, 0.1):
        tracker, gap = fit_gain_against_a_push(10 * band, push_steps=200, steps=300, integral_rate=0.01,
                                               integral_limit=limit)
        overshoot[limit] = float(gap.max())
        if limit:
            assert float(tracker.integral.abs().max()) <= 2 * limit + 1e-6
    assert overshoot[0.1] < 0.5 * overshoot[0.0], overshoot
    with pytest.raises(config_lib.ConfigError, match="spectrum_integral_limit must be >= 0"):
        config_lib.load("gan", ["loss.spectrum_integral_limit=-1"])
    with pytest.raises(config_lib.ConfigError, match="spectrum_integral_limit shapes the spectral term's integral, which is off"):
        config_lib.load("gan", ["loss.spectrum_integral_limit=0.1"])  # no integral to bound
    with pytest.raises(config_lib.ConfigError, match="spectrum_window shapes the spectral term, which is off"):
        config_lib.load("gan", ["loss.spectrum_weight=0", "loss.spectrum_window=hann"])
    quiet = config_lib.load("gan", ["loss.spectrum_weight=0"])  # the file's spectral settings go with the term
    assert (quiet.loss.spectrum_weighting, quiet.loss.spectrum_outlier_gap) == ("uniform", 0.0)


def test_the_spectral_gap_can_be_read_from_draws_made_as_after_training(shapes_dir):
    """``loss.spectrum_measure = "inference"``: batch norm draws with the batch's statistics in
    training and with its running ones after, so the two spectra can differ; the gap (and its
    integral) is then read from draws made as ``sample`` makes them, while the pull still acts
    on the training batch. The generator is left training."""
    from t2i.training.spectrum import inference_draws, mean_power_spectrum

    vocab = load_vocabulary(shapes_dir)
    images, word_ids = fixed_batch(shapes_dir, 16)
    family = family_for("gan.toml", vocab.vectors, *TINY_GAN, "loss.spectrum_weight=5", "loss.spectrum_measure=inference")
    generator = family.model
    torch.manual_seed(1)
    drawn = inference_draws(generator, word_ids)
    assert generator.training
    generator.eval()
    torch.manual_seed(1)
    assert torch.equal(drawn, generator.sample(word_ids)[:, 0]), "as the trained model samples"
    generator.train()
    tracker, fake = SpectrumTracker(64), images.clone().requires_grad_()
    tracker(fake, images, measured=drawn).backward()
    assert torch.allclose(tracker.fake, mean_power_spectrum(drawn)) and float(fake.grad.abs().sum()) > 0
    terms = family.train_step(images, word_ids, 0.0)
    assert generator.training and int(family.spectra.steps) == 1 and terms["spectrum"].item() > 0
    with pytest.raises(config_lib.ConfigError, match="spectrum_measure must be one of"):
        config_lib.load("gan", ["loss.spectrum_measure=eval"])


def test_per_channel_noise_images_are_uncorrelated_so_a_conv_after_them_shapes_no_direction():
    """``per_channel``: each channel's noise image is the basis under its own row of Hadamard
    signs (uncorrelated images of the same variance). One shared image passes a conv as through a
    single 3x3 kernel, whose power swings with the frequency; independent images add as the sum of
    the kernels' powers, nearly flat. Shared noise saves no ``signs`` (old checkpoints load as
    before); per-channel checkpoints restore theirs."""
    from t2i.models.blocks import PixelNoise, channel_signs

    torch.manual_seed(0)
    signs = channel_signs(96, 64)
    assert torch.equal(signs[:64] @ signs[:64].t(), 64 * torch.eye(64)), "orthogonal rows"
    assert set(signs.unique().tolist()) == {-1.0, 1.0} and channel_signs(5, 48).shape == (5, 48)
    shared = PixelNoise(64, 24, 32, initial=1.0, basis="flat")
    per_channel = PixelNoise(64, 24, 32, initial=1.0, basis="flat", per_channel=True)
    assert "signs" not in shared.state_dict() and per_channel.state_dict()["signs"].shape == (24, 64)
    reloaded = PixelNoise(64, 24, 32, basis="flat", per_channel=True)  # draws signs of its own
    assert not torch.equal(reloaded.signs, per_channel.signs)
    reloaded.load_state_dict(per_channel.state_dict())
    assert torch.equal(reloaded.signs, per_channel.signs), "a checkpoint restores its channels' signs"
    source, blank = torch.randn(512, 64), torch.zeros(512, 24, 32, 32)
    images = per_channel(blank, source).detach()
    assert abs(float(images.var()) - 1) < 0.1 and torch.equal(per_channel(blank, torch.zeros(512, 64)), blank)
    correlation = torch.corrcoef(images.transpose(0, 1).reshape(24, -1))
    assert float((correlation - torch.eye(24)).abs().max()) < 0.05, "the channels' images are uncorrelated"

    conv = torch.nn.Conv2d(24, 1, 3, padding=1, padding_mode="circular", bias=False)

    def spread_after_conv(layer: PixelNoise) -> float:  # std over frequencies of log10 power, in decades
        power = torch.fft.fft2(conv(layer(blank, source)).detach()[:, 0]).abs().pow(2).mean(0)
        return float(torch.log10(power.flatten()[1:]).std())

    assert spread_after_conv(per_channel) < 0.5 * spread_after_conv(shared), (
        spread_after_conv(per_channel), spread_after_conv(shared))
    with pytest.raises(config_lib.ConfigError, match="noise_images.* shapes the noise inputs, which are off"):
        config_lib.load("gan", ["model.pixel_noise=false", "model.noise_images=per_channel"])
