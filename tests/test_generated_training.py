"""Generated images in the classifier's training set: their loss weight, their draw probability, pretraining on
them first; each recipe changes what it says it changes."""

import numpy as np
import pytest
import torch
from PIL import Image

from taxadiffusion.cli import main
from taxadiffusion.errors import ConfigError
from taxadiffusion.eval.classifier import _loss, mixed_batches
from taxadiffusion.eval.settings import GeneratedRecipe


def pools(n_real=40, n_generated=60):
    """Real images all black, generated all white: each batch item tells its source by its pixels."""
    real = np.zeros((n_real, 4, 4, 3), np.uint8), torch.zeros(n_real, 2, dtype=torch.long)
    generated = np.full((n_generated, 4, 4, 3), 255, np.uint8), torch.ones(n_generated, 2, dtype=torch.long)
    return real, generated


def sources(batches, epochs=20):
    for _ in range(epochs):
        for images, _ids, weights in batches():
            yield images[:, 0, 0, 0] > 0, weights


def test_a_draw_probability_is_what_a_batch_sees_and_weights_follow_the_source():
    real, generated = pools()
    recipe = GeneratedRecipe(generated_weight=0.3, generated_probability=0.25)
    seen = list(sources(mixed_batches(real, generated, 8, seed=0, recipe=recipe)))
    fake = torch.cat([is_fake for is_fake, _ in seen])
    weights = torch.cat([w for _, w in seen])
    assert 0.2 < fake.float().mean().item() < 0.3
    assert torch.equal(weights[fake], torch.full((int(fake.sum()),), 0.3))
    assert torch.equal(weights[~fake], torch.ones(int((~fake).sum())))
    assert len(seen) == 20 * (40 // 8)  # an epoch is what the real images fill


def test_without_a_probability_the_images_form_one_pool():
    real, generated = pools()
    epoch = list(sources(mixed_batches(real, generated, 10, seed=0, recipe=GeneratedRecipe()), epochs=1))
    fake = torch.cat([is_fake for is_fake, _ in epoch])
    assert len(fake) == 100 and int(fake.sum()) == 60  # each image once
    never = GeneratedRecipe(generated_probability=0.0)
    assert not any(f.any() for f, _ in sources(mixed_batches(real, generated, 8, seed=0, recipe=never), epochs=3))


def test_a_zero_weight_leaves_only_the_real_images_loss():
    torch.manual_seed(0)
    logits = [torch.randn(6, 3), torch.randn(6, 5)]
    ids = torch.tensor([[0, 1], [1, -1], [2, 4], [0, 0], [1, 2], [2, 3]])
    weights = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    real_only = _loss([lg[:3] for lg in logits], ids[:3], None)
    torch.testing.assert_close(_loss(logits, ids, weights), real_only)
    torch.testing.assert_close(_loss(logits, ids, torch.ones(6)), _loss(logits, ids, None))


def test_recipe_values_are_checked():
    with pytest.raises(ConfigError, match="generated_probability"):
        GeneratedRecipe(generated_probability=1.5)
    with pytest.raises(ConfigError, match="generated_weight"):
        GeneratedRecipe(generated_weight=-1)


def test_classifier_train_with_generated_images(tmp_path, capsys):
    """Through the command: real images plus a generated set (one taxon the real set lacks, counted), pretraining
    on the generated images first, then half the batch positions drawn from them."""
    rows = ["file_name,class,order"]
    for i in range(24):
        order = ("Perciformes", "Labriformes")[i % 2]
        Image.new("RGB", (16, 16), (200 * (i % 2), 40, 90)).save(tmp_path / f"real{i}.png")
        rows.append(f"real{i}.png,Actinopterygii,{order}")
    (tmp_path / "real.csv").write_text("\n".join(rows) + "\n")
    generated = ["file_name,class,order"]
    for i in range(10):
        order = ("Perciformes", "Labriformes", "Unknowniformes")[i % 3]
        Image.new("RGB", (16, 16), (0, 200, 90)).save(tmp_path / f"gen{i}.png")
        generated.append(f"gen{i}.png,Actinopterygii,{order}")
    (tmp_path / "generated.csv").write_text("\n".join(generated) + "\n")
    args = ["classifier", "train", "--data", "csv", str(tmp_path / "real.csv"), "--out", str(tmp_path / "clf")]
    args += ["--generated", "csv", str(tmp_path / "generated.csv"), "--steps", "3", "--batch-size", "4"]
    args += ["--resolution", "16", "--width", "8", "--pretrain-steps", "2", "--generated-probability", "0.5"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "3 generated images of taxa the real set lacks" in out
    assert (tmp_path / "clf" / "heldout_accuracy.json").is_file()


def test_a_pool_smaller_than_a_batch_trains_as_one_batch():
    """A few generated images to pretrain on (fewer than a batch) make one batch an epoch, not an endless loop."""
    from taxadiffusion.eval.classifier import pool_batches

    real, generated = pools(n_real=40, n_generated=5)
    epoch = list(pool_batches(*generated, 8, seed=0)())
    assert [len(ids) for _, ids in epoch] == [5]
    assert [len(ids) for _, ids in pool_batches(*real, 8, seed=0)()] == [8] * 5  # full batches as before
    few_real = real[0][:3], real[1][:3]
    one_pool = list(sources(mixed_batches(few_real, generated, 64, seed=0, recipe=GeneratedRecipe()), epochs=1))
    assert [len(is_fake) for is_fake, _ in one_pool] == [8]


def test_training_without_images_stops_with_a_message():
    from taxadiffusion.errors import InputError
    from taxadiffusion.eval.classifier import pool_batches, train_classifier
    from taxadiffusion.taxonomy import Taxonomy

    taxonomy = Taxonomy(["class", "order"], {("Actinopterygii",): 1, ("Actinopterygii", "Perciformes"): 1})
    empty = np.zeros((0, 4, 4, 3), np.uint8), torch.zeros(0, 2, dtype=torch.long)
    with pytest.raises(InputError, match="no training images"):
        train_classifier(taxonomy, pool_batches(*empty, 8, seed=0), 3, resolution=4, width=4, progress=False)
