"""engine.core.ids.IdIndex: the same answers as a dict over the ids, for any key."""
from __future__ import annotations

import numpy as np
import pytest

from engine.core.ids import IdIndex


def test_id_index_answers_as_a_dict_would():
    rng = np.random.default_rng(0)
    ids = np.array(["i0", "i10", "i2", "ü7", "b", "item-42", "i1"])[rng.permutation(7)]
    ix, d = IdIndex(ids), {s: i for i, s in enumerate(ids.tolist())}
    keys = [*d, "i", "i100", "i10x", "", "ü", "item-420", "a", "zz"]   # prefixes, extensions, outside both ends
    assert ix.rows(keys).tolist() == [d.get(k, -1) for k in keys]
    assert ix.known(keys).tolist() == [d[k] for k in keys if k in d]
    assert ix.rows(keys).dtype == np.int32 and ix.rows([]).shape == (0,)
    assert all((k in ix) == (k in d) for k in keys) and ix.get("zz", 7) == 7 and len(ix) == 7
    assert ix["item-42"] == d["item-42"]
    with pytest.raises(KeyError):
        ix["i100"]
    assert IdIndex(np.array([], "<U1")).rows(["a"]).tolist() == [-1]
