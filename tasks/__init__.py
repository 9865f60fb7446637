"""Downstream tasks run through tasks/main.py: zero-shot GPT evaluation (WIKITEXT103,
LAMBADA) and BERT fine-tuning (RACE, MNLI, QQP)."""
