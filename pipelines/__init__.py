"""Pipeline programs: the tiny-base bootstrap, the fine-tune recipe, merge/export."""
