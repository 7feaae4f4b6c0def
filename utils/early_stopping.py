"""Early stopping on several metrics at once."""


class EarlyStopping:
    """Stop when none of the watched metrics has improved for ``patience`` consecutive epochs.

    The counter resets whenever any watched metric reaches a new best (the reference code's
    rule; the reference stops when its counter reaches 5, ``--patience`` defaults to 4: README,
    "Differences from the reference").
    """

    def __init__(self, patience):
        self.patience = patience
        self.bad_epochs = 0

    def step(self, improved_any):
        """Record one epoch; return True when training should stop."""
        self.bad_epochs = 0 if improved_any else self.bad_epochs + 1
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self):
        return {"patience": self.patience, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state):
        self.bad_epochs = int(state["bad_epochs"])
