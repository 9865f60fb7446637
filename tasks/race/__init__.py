"""RACE reading comprehension: four-way multiple choice from RACE's JSON files."""
