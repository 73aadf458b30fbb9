"""agent-service: LLM agents on Kafka task events, one result per task.

Your own agent imports from :mod:`service.sdk` and nothing else; the sub-packages are the service's
own (README.md, "Architecture", draws them and the rule their imports follow).
"""
