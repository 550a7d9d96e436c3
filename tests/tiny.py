"""The tiny model and image size the end-to-end tests train: a 2-worker epoch takes seconds."""

TINY = {
    "model.embed_dim": 32, "model.depth": 2, "model.num_heads": 2, "model.dec_dim": 32,
    "model.dec_depth": 1, "model.dec_heads": 2, "model.patch_size": 2, "model.prior_hidden": 64,
    "data.image_size": 16, "train.max_failures": 0,
}
