"""DataModules over stored artifacts: response sequences (SFT, scoring) and preference pairs."""
from __future__ import annotations

from typing import Any, Sequence

import lightning as L
from torch.utils.data import DataLoader

from cdpo.data.collate import TruncationCounter, collate_pairs, collate_sequences


class _RecordsDataModule(L.LightningDataModule):
    def __init__(self, records: Sequence[dict[str, Any]], *, pad_id: int, batch_size: int = 8,
                 shuffle: bool = True, seed: int = 0, max_length: int = 1536, max_prompt_length: int = 512,
                 padding_side: str = "right", val_records: Sequence[dict[str, Any]] = ()):
        super().__init__()
        if not records:
            raise ValueError("no records to load")
        self.records, self.batch_size, self.shuffle, self.seed = list(records), batch_size, shuffle, seed
        self.val_records = list(val_records)
        self.collate_kw = dict(pad_id=pad_id, max_length=max_length, max_prompt_length=max_prompt_length,
                               padding_side=padding_side)
        self.truncation = TruncationCounter()

    def _collate(self, items):
        raise NotImplementedError

    def _loader(self, shuffle: bool, records=None) -> DataLoader:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.records if records is None else records, batch_size=self.batch_size, shuffle=shuffle,
                          generator=generator, collate_fn=self._collate)

    def train_dataloader(self):
        return self._loader(self.shuffle)

    def predict_dataloader(self):
        return self._loader(False)


class SequencesDataModule(_RecordsDataModule):
    """Records with prompt_ids and response_ids (optionally a per-token weights list under `weights_key`)."""

    def __init__(self, records, *, weights_key: str | None = None, **kw):
        super().__init__(records, **kw)
        self.weights_key = weights_key

    def val_dataloader(self):  # here only: Lightning warns about a val_dataloader beside a module without validation
        return self._loader(False, self.val_records) if self.val_records else []

    def _collate(self, items):
        return collate_sequences(items, weights_key=self.weights_key, counter=self.truncation, **self.collate_kw)


class PairsDataModule(_RecordsDataModule):
    """Preference pairs: prompt_ids, chosen_ids, rejected_ids [, *_p_ce] [, ref_chosen, ref_rejected]."""

    def __init__(self, records, *, with_weights: bool = False, with_ref: bool = False, **kw):
        super().__init__(records, **kw)
        self.with_weights, self.with_ref = with_weights, with_ref

    def _collate(self, items):
        return collate_pairs(items, with_weights=self.with_weights, with_ref=self.with_ref,
                             counter=self.truncation, **self.collate_kw)
