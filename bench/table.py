"""The bench scripts' one output format: `| measure | figure |` rows that `make bench` prints as one table."""


def versus(a, b, unit, digits=1):
    """'a / b unit = a/b x' for the bench tables."""
    return f"{a:.{digits}f} / {b:.{digits}f} {unit} = {a / b:.2f}x"


def bench_rows(path, rows):
    """bench/*.py --table FILE: append `| measure | figure |` rows; `make bench` prints the file as one table."""
    if path:
        with open(path, "a") as f:
            f.writelines(f"| {what} | {figure} |\n" for what, figure in rows)
