"""The Groups page's sections, drawn in order by `pages/3_groups.py`: the settings, the
decision (picker, counts, pre-flight, buttons), what it costs, and the views of the proposal.

Each section is one function over the session (`explorer.app.session.Session`) that reads
the library and draws; what the page decides without drawing is `explorer.app.decide`'s. A
package, not a page: the sidebar does not list it.
"""
