"""The run record (results.json) and its views: console, JUnit, TAP, HTML; known issues; repro bundles."""
