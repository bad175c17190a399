"""What a backup is checked against: the number of rows of every table of the apps' data."""

BACKED_UP_TABLES = (
    "studies_study", "studies_classpair", "studies_condition", "studies_rater", "studies_assignment",
    "studies_block", "studies_trial", "studies_response", "studies_correction", "studies_auditentry",
    "explain_dataset", "explain_image", "explain_classifier", "explain_explanation",
)  # fmt: skip


def database_counts(connection) -> dict[str, int]:
    """Rows per table in ``connection`` (a Django connection or a psycopg one)."""
    counts = {}
    with connection.cursor() as cursor:
        for table in BACKED_UP_TABLES:
            cursor.execute(f"SELECT count(*) FROM {table}")  # table names are constants above
            counts[table] = cursor.fetchone()[0]
    return counts
