"""Chapter 6: reading the claims table."""


def claims_that_hold(table) -> int:
    return int((table["holds here"] == "yes").sum())


def seeds_behind(claims: dict) -> list:
    return list(claims["seeds"])  # printed at the top of the chapter
