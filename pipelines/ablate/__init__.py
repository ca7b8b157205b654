"""lorapipe ablate: the classic LoRA tables (rank, target modules, method, variant) as Tune grids."""
