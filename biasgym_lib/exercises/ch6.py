"""Chapter 6's exercises: reading the claims table."""

from __future__ import annotations

from . import Checked, check


def check_claims_that_hold(answer, table) -> Checked:
    return check("Exercise 1", answer, int((table["holds here"] == "yes").sum()), hint='look at the "holds here" column')


def check_seeds(answer, claims: dict) -> Checked:
    return check("Exercise 2", answer, list(claims["seeds"]), hint="the profile's seeds (or the parameters cell's)")
