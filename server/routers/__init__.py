"""One module per resource: teams, corpora, captures (and jobs), stores."""
