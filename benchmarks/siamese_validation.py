"""Chapter 2: choose the Siamese networks' settings on validation data only.

Three choices of ``chapters/02_siamese_networks.ipynb``, each made on a split
that the chapter never tests on:

- faces: dropout 0 or 0.3 in the face convnet. The 30 *training* people of
  AT&T are split into 24 to train on and 6 held out; scored by 6-way 1-shot
  accuracy (200 fixed episodes, 5 queries per person) and the verification AUC
  (1000 fixed pairs) of the 6 held-out people. The 10 test people play no part.
- audio: the number of training steps of the per-frame network (compared by
  time warping). Trained on the digits 0-2 of speakers 0-1, scored on 3-way
  1-shot episodes of the digits 3-5 of speakers 2-3 (all on the training side
  of the chapter's split: digits 0-5, speakers 0-3).
- Omniglot: ``active_negatives`` on or off, trained on the ``train``
  characters, scored by 20-way 1-shot accuracy on 200 episodes of the
  ``val`` characters.

It also checks, on the same held-out people, that a second network trained to
name the 24 people (cosine softmax) adds to the contrastive one
(``faces_pair``).

The networks, step counts and batches are the chapter's quick profile.
Usage: ``BOOKCODE_DATA=... python benchmarks/siamese_validation.py [--only faces audio omniglot]``
"""

from __future__ import annotations

import argparse
import os
import resource
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import bookcode.notebook

bookcode.notebook.setup(seed=2)

import keras
import numpy as np
import tensorflow as tf

from bookcode import audio, datasets, nets
from bookcode.episodes import ClassDataset, EpisodeSampler, PairSampler
from bookcode.evaluation import evaluate
from bookcode.metric import SiameseNetwork, roc_auc

FACE_SIZE = (28, 23)
FACE_STEPS = 300
AUDIO_STEPS = (100, 200, 400)
OMNIGLOT_STEPS = 300
MARGIN = 1.0


def cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def face_embedding(dropout):
    def conv_block(filters):
        return keras.Sequential(
            [
                keras.layers.Conv2D(filters, 3, padding="same"),
                keras.layers.BatchNormalization(momentum=0.9),
                keras.layers.ReLU(),
                keras.layers.MaxPooling2D(2),
            ]
        )

    layers = [
        keras.Input(FACE_SIZE + (1,)),
        keras.layers.RandomFlip("horizontal"),
        keras.layers.RandomTranslation(0.05, 0.05),
        *[conv_block(f) for f in (16, 32, 64)],
        keras.layers.Flatten(),
    ]
    if dropout:
        layers.append(keras.layers.Dropout(dropout))
    layers += [keras.layers.Dense(64), keras.layers.UnitNormalization()]
    return keras.Sequential(layers)


def faces():
    people = datasets.att_faces("train", num_train_subjects=30, image_size=FACE_SIZE)
    train, held_out = people.classes(range(24)), people.classes(range(24, 30))
    episodes = EpisodeSampler(held_out, ways=6, shots=1, queries=5).fixed(200)
    left, right, same = PairSampler(held_out).fixed(1000, seed=2)
    print(f"faces: 24 training people, 6 held out (of the 30 training people), {FACE_STEPS} steps")
    print("| dropout | 6-way 1-shot, held-out people | verification AUC | CPU s |")
    print("|---|---|---|---|")
    for dropout in (0.0, 0.3):
        start = cpu_seconds()
        model = contrastive_faces(train, dropout)
        result = evaluate(model, episodes)
        auc = roc_auc(same, model.predict((left, right), verbose=0))
        print(f"| {dropout} | {result} | {auc:.3f} | {cpu_seconds() - start:.0f} |", flush=True)


def contrastive_faces(train, dropout):
    """The chapter's contrastive face network trained on ``train``'s pairs."""
    keras.utils.set_random_seed(2)
    model = SiameseNetwork(face_embedding(dropout), head="contrastive", margin=MARGIN)
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, FACE_STEPS, alpha=0.05)
    model.compile(optimizer=keras.optimizers.Adam(schedule))
    model.fit(
        PairSampler(train, seed=0).tf_dataset(32),
        steps_per_epoch=50,
        epochs=FACE_STEPS // 50,
        verbose=0,
    )
    return model


def faces_pair():
    """The contrastive network (no dropout), the cosine-softmax classifier of
    the 24 people, and the two together (unit embeddings side by side / sqrt 2),
    on the same held-out episodes."""
    from bookcode.metric import CosineClassifier, concatenate_embeddings

    people = datasets.att_faces("train", num_train_subjects=30, image_size=FACE_SIZE)
    train, held_out = people.classes(range(24)), people.classes(range(24, 30))
    episodes = EpisodeSampler(held_out, ways=6, shots=1, queries=5).fixed(200)
    start = cpu_seconds()
    pairs = contrastive_faces(train, 0.0)
    keras.utils.set_random_seed(2)
    embedding = face_embedding(0.0)
    classifier = keras.Sequential([embedding, CosineClassifier(train.num_classes, scale=16.0)])
    schedule = keras.optimizers.schedules.CosineDecay(1e-3, FACE_STEPS, alpha=0.05)
    classifier.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    photos = tf.data.Dataset.from_tensor_slices((train.x, train.y))
    classifier.fit(
        photos.shuffle(400, seed=0).repeat().batch(32),
        steps_per_epoch=50,
        epochs=FACE_STEPS // 50,
        verbose=0,
    )
    both = SiameseNetwork(concatenate_embeddings(pairs.embedding, embedding), margin=MARGIN)
    print("faces, 6 held-out training people, 6-way 1-shot:")
    print(f"  contrastive network: {evaluate(pairs, episodes)}")
    print(f"  classifier network:  {evaluate(SiameseNetwork(embedding, margin=MARGIN), episodes)}")
    print(f"  both:                {evaluate(both, episodes)}")
    print(f"  ({cpu_seconds() - start:.0f} CPU s)", flush=True)


def word_features(m, n, frames=48):
    """The chapter's features: the recording's MFCC frames + deltas, stretched
    to 48 frames, each coefficient standardised over the recording."""
    m = m[:n]
    m = np.concatenate([m, np.gradient(m, axis=0) if n > 1 else 0 * m], axis=1)
    m = tf.image.resize(m[:, :, None], (frames, m.shape[1])).numpy()[..., 0]
    return (m - m.mean(0)) / (m.std(0) + 1e-6)


def audio_frame_network(shape):
    frames, num_features = shape[:2]
    return keras.Sequential(
        [
            keras.Input(shape),
            keras.layers.Reshape((frames, num_features)),
            keras.layers.Conv1D(64, 1),
            keras.layers.BatchNormalization(momentum=0.9),
            keras.layers.ReLU(),
            keras.layers.Conv1D(num_features, 1),
            keras.layers.UnitNormalization(axis=-1),
        ]
    )


def spoken_words():
    digits = datasets.spoken_digits(group_by="digit")
    mfccs = audio.mfcc(digits.x, num_coefficients=13, log_offset=1e-3).numpy()
    samples = np.array([np.flatnonzero(w).max() + 1 for w in digits.x])
    frames = np.clip(1 + (samples - 256) // 80, 1, mfccs.shape[1])
    features = np.stack([word_features(m, n) for m, n in zip(mfccs, frames)])[..., None]
    return ClassDataset(features, digits.y, digits.class_names, digits.metadata)


def spoken():
    words = spoken_words()
    digit, speaker = words.metadata["digit"], words.metadata["speaker"]
    train = words.where((digit <= 2) & (speaker <= 1))
    held_out = words.where((digit >= 3) & (digit <= 5) & (speaker >= 2) & (speaker <= 3))
    episodes = EpisodeSampler(held_out, ways=3, shots=1, queries=5).fixed(200)
    print(
        "audio: train digits 0-2 of speakers 0-1, validate 3-way 1-shot on digits 3-5 of speakers 2-3"
    )
    print(f"raw features, time warping: {evaluate(audio.AlignmentNearestNeighbour(), episodes)}")
    print("| steps | 3-way 1-shot, time warping over the learned frames | CPU s |")
    print("|---|---|---|")
    for steps in AUDIO_STEPS:
        start = cpu_seconds()
        keras.utils.set_random_seed(2)
        frames = audio_frame_network(train.example_shape)
        model = SiameseNetwork(
            keras.Sequential([frames, keras.layers.Flatten()]), head="contrastive", margin=MARGIN
        )
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(
            EpisodeSampler(train, ways=3, shots=1, queries=7, seed=0).tf_dataset(),
            steps_per_epoch=50,
            epochs=steps // 50,
            verbose=0,
        )
        result = evaluate(audio.AlignmentNearestNeighbour(frames), episodes)
        print(f"| {steps} | {result} | {cpu_seconds() - start:.0f} |", flush=True)


def omniglot():
    train = datasets.omniglot("train")
    episodes = EpisodeSampler(datasets.omniglot("val"), ways=20, shots=1, queries=1).fixed(200)
    print(f"Omniglot: train characters, 20-way 1-shot on val characters, {OMNIGLOT_STEPS} steps")
    print("| active negatives | 20-way 1-shot, val | CPU s |")
    print("|---|---|---|")
    for active in (False, True):
        start = cpu_seconds()
        keras.utils.set_random_seed(2)
        embedding = nets.conv4(
            input_shape=(28, 28, 1),
            filters=64,
            fused_batch_norm=True,
            batch_norm_momentum=0.9,
            dtype=nets.fast_precision(),
        )
        embedding.add(keras.layers.UnitNormalization(dtype="float32"))
        model = SiameseNetwork(embedding, margin=MARGIN, active_negatives=active)
        model.compile(optimizer=keras.optimizers.Adam(1e-3))
        model.fit(
            EpisodeSampler(train, ways=32, shots=1, queries=1, seed=0).tf_dataset(),
            steps_per_epoch=100,
            epochs=OMNIGLOT_STEPS // 100,
            verbose=0,
        )
        result = evaluate(model, episodes)
        print(f"| {active} | {result} | {cpu_seconds() - start:.0f} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=["faces", "faces_pair", "audio", "omniglot"])
    args = parser.parse_args()
    started = time.time()
    for name in args.only:
        {"faces": faces, "faces_pair": faces_pair, "audio": spoken, "omniglot": omniglot}[name]()
    print(f"{time.time() - started:.0f} s wall")
