"""The web dashboard, served by the API itself (issue 12): HTML pages that call the JSON API,
sign-in by API key into an HttpOnly cookie, and the interactive API docs, every asset from the
package (`static/vendor/`), none from the internet."""
