"""Data: raw captioned images -> prepared Parquet (``prepare``, writer) -> reads of it
(``dataset``) -> Ray Datasets and each worker's batches (``feed``)."""
