"""`chat-api chat`: a terminal client of the API, over HTTP only (`conversation.py` the calls,
`terminal.py` the prompt loop).

It imports httpx and nothing else of this package: it is what any client could be, and it runs
against any deployment of the service, not only one in this process.
"""
