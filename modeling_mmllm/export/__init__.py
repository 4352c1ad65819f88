"""Export (library side): the model card, atomic saving, folder upgrades, the Hub upload."""
