"""Ranker rows that show a logged item as a cold item would look at serving ("id dropout" for the rankers).

A cold item has no id row in the two-tower tables, so its item embedding comes from category,
author and content alone, and its counters (impressions, positives, hotness) are zero. The
rankers train on logged impressions, where such items are rare (only items created during the
ranker window), so without help they learn that "no history" means "shown by chance" and bury
cold items whatever their content says. Re-featurizing a random share of the training rows as
if their item were cold, same user, same moment, same label, teaches the rankers what an item
without history is worth from its content: the row's label is what that content earned.

The rows are re-built by `train.ranker_rows` itself, with the catalog embedded without id rows
and the item counters zeroed, so a masked row is exactly what the serving featurizer computes
for a cold item (age excepted: it stays the item's real age at the impression).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from engine.core.featurize import Tables
from engine.core.state import FeatureState
from model_export import train
from model_export.dataset import Dataset


def content_only(tables: Tables, tt_tables: dict[str, np.ndarray], item_emb: train.EmbedFn) -> Tables:
    """The tables as a cold item sees them: the catalog embedded with every id row zeroed."""
    no_ids = {**tt_tables, "item_id_emb": np.zeros_like(tt_tables["item_id_emb"])}
    view = dataclasses.replace(tables, item_id_emb=no_ids["item_id_emb"])
    embedded = train.embed_catalog(view, no_ids, item_emb)
    return dataclasses.replace(tables, item_emb=embedded.item_emb)   # user tower keeps its id rows


def no_item_history(state: FeatureState) -> FeatureState:
    """The state with every item's counters at zero (users' own history kept)."""
    zero = np.zeros_like(state.item_n_imp)
    return dataclasses.replace(state, item_n_imp=zero, item_n_pos=zero, item_hot=np.zeros_like(state.item_hot))


def mask_history(ds: Dataset, rows: train.RankerRows, log_rows: np.ndarray, cold_tables: Tables,
                 state: FeatureState, user_emb: train.EmbedFn, share: float,
                 rng: np.random.Generator) -> np.ndarray:
    """Re-featurize a random `share` of `rows` (built from the log rows `log_rows` with `state`)
    as cold items, in place; returns the positions replaced."""
    picked = np.sort(rng.choice(log_rows.size, round(share * log_rows.size), replace=False))
    if picked.size == 0:
        return picked
    cold = train.ranker_rows(ds, cold_tables, log_rows[picked], no_item_history(state), user_emb, "cold view")
    rows.item[picked] = cold.item          # the user side does not depend on the item: unchanged
    return picked
