"""Phase 1, the corpus: parsing, cleaning, de-duplication and the split (decompress, preprocess)."""
