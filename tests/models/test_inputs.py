"""Model inputs: the soft prompt spliced into the input embeddings, and where its gradient goes."""

import jax
import jax.numpy as jnp
import numpy as np

from dro_jax.models.inputs import insert_soft_prompt


def test_insert_soft_prompt_places_rows_and_routes_gradients():
    embeds = jnp.zeros((2, 6, 3))
    soft = jnp.arange(6.0).reshape(2, 3) + 1
    offsets = jnp.array([1, -1])
    out = insert_soft_prompt(embeds, soft, offsets)
    np.testing.assert_array_equal(out[0, 1:3], soft)
    assert float(jnp.abs(out[0, [0, 3, 4, 5]]).sum()) == 0 and float(jnp.abs(out[1]).sum()) == 0
    grad = jax.grad(lambda s: insert_soft_prompt(embeds, s, jnp.array([1, 2])).sum())(soft)
    np.testing.assert_array_equal(grad, np.full((2, 3), 2.0))  # each row fills one position in each of 2 rows


