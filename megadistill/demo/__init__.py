"""The demo study: small teachers and students on a synthetic language, fitted laws and a report."""
