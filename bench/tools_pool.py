"""A pool of realistic agent tool schemas (OpenAI function-tool shape) for the workload.

Names, descriptions, nested object parameters, arrays and enums like the tools real agent
frameworks ship (file systems, issue trackers, calendars, databases, deploys). Every schema
uses only the JSON Schema keywords that constrained decoding and `programs.check_tools`
accept; required fields are few and short so a greedy small model writes bounded calls.
"""

from __future__ import annotations

from typing import Any


def _obj(props: dict[str, Any], required: list[str], description: str | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props, "required": required, "additionalProperties": False}
    if description:
        schema["description"] = description
    return schema


def _s(description: str, max_length: int = 32) -> dict[str, Any]:
    # maxLength keeps greedy decoding of a small model from looping inside a string.
    return {"type": "string", "description": description, "maxLength": max_length}


def _e(description: str, values: list[str]) -> dict[str, Any]:
    return {"type": "string", "description": description, "enum": values}


def _i(description: str, minimum: int = 0, maximum: int = 100_000) -> dict[str, Any]:
    return {"type": "integer", "description": description, "minimum": minimum, "maximum": maximum}


def _b(description: str) -> dict[str, Any]:
    return {"type": "boolean", "description": description}


def _arr(items: dict[str, Any], description: str, max_items: int = 3) -> dict[str, Any]:
    return {"type": "array", "items": items, "description": description, "maxItems": max_items}


def _tool(name: str, description: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


TOOL_POOL: list[dict[str, Any]] = [
    _tool(
        "search_documents",
        "Full-text search over the team's knowledge base. Returns the best matching documents with "
        "their titles, paths and a short snippet. Use it before answering questions about internal "
        "processes, architecture decisions or runbooks.",
        _obj(
            {
                "query": _s("What to look for, in natural language or keywords."),
                "filters": _obj(
                    {
                        "space": _e("Which document space to search.", ["engineering", "product", "support", "legal", "all"]),
                        "updated_after": _s("Only documents updated after this ISO-8601 date."),
                        "tags": _arr(_s("A tag."), "Documents must carry all of these tags."),
                    },
                    [],
                    "Optional restrictions of the search.",
                ),
                "limit": _i("How many results to return (1-20)."),
            },
            ["query"],
        ),
    ),
    _tool(
        "read_file",
        "Read a text file from the repository checkout. Large files are truncated to the requested "
        "line range; binary files are refused.",
        _obj(
            {
                "path": _s("Repository-relative path of the file."),
                "range": _obj({"start": _i("First line, 1-based."), "end": _i("Last line, inclusive.")}, ["start", "end"],
                              "Optional line range."),
            },
            ["path"],
        ),
    ),
    _tool(
        "write_file",
        "Create or overwrite a text file in the repository checkout. The change is staged, not "
        "committed; use create_pull_request to publish it.",
        _obj(
            {
                "path": _s("Repository-relative path of the file."),
                "content": _s("The complete new content of the file.", 120),
                "mode": _e("How to write.", ["overwrite", "append", "create_only"]),
            },
            ["path", "content"],
        ),
    ),
    _tool(
        "run_shell_command",
        "Run a shell command in the sandboxed build container and return its exit code, stdout and "
        "stderr (truncated to 4 KB each). Network access is disabled.",
        _obj(
            {
                "command": _s("The command line to run."),
                "working_directory": _s("Directory to run it in, relative to the checkout root."),
                "timeout_seconds": _i("Kill the command after this many seconds."),
                "environment": _arr(_obj({"name": _s("Variable name."), "value": _s("Variable value.")}, ["name", "value"]),
                                    "Extra environment variables."),
            },
            ["command"],
        ),
    ),
    _tool(
        "create_issue",
        "Open a new issue in the project tracker. Assign it and label it so the right team sees it.",
        _obj(
            {
                "title": _s("One-line summary."),
                "body": _s("Markdown description: what happened, what was expected, how to reproduce.", 120),
                "priority": _e("How urgent it is.", ["p0", "p1", "p2", "p3"]),
                "labels": _arr(_e("A label.", ["bug", "feature", "docs", "performance", "security", "flaky-test"]), "Labels to apply."),
                "assignee": _s("User name of the assignee."),
            },
            ["title", "priority"],
        ),
    ),
    _tool(
        "update_issue",
        "Change the state, priority, assignee or labels of an existing issue, or add a comment.",
        _obj(
            {
                "issue_id": _i("Number of the issue."),
                "state": _e("New state.", ["open", "in_progress", "blocked", "closed"]),
                "comment": _s("A comment to add."),
                "changes": _obj(
                    {
                        "priority": _e("New priority.", ["p0", "p1", "p2", "p3"]),
                        "assignee": _s("New assignee."),
                        "add_labels": _arr(_s("A label."), "Labels to add."),
                    },
                    [],
                    "Field changes.",
                ),
            },
            ["issue_id", "state"],
        ),
    ),
    _tool(
        "query_database",
        "Run a read-only SQL query against the analytics warehouse. Queries that scan more than "
        "10 GB are refused; always filter on a date partition.",
        _obj(
            {
                "sql": _s("The SELECT statement.", 120),
                "database": _e("Which warehouse database.", ["events", "billing", "crm", "product_analytics"]),
                "max_rows": _i("Most rows to return."),
            },
            ["sql", "database"],
        ),
    ),
    _tool(
        "get_weather_forecast",
        "Weather forecast for a location: temperature, precipitation probability and wind for each "
        "of the next days.",
        _obj(
            {
                "location": _obj(
                    {"city": _s("City name."), "country_code": _s("ISO 3166-1 alpha-2 country code.")},
                    ["city"],
                    "Where.",
                ),
                "days": _i("How many days ahead (1-10)."),
                "units": _e("Unit system.", ["metric", "imperial"]),
            },
            ["location", "units"],
        ),
    ),
    _tool(
        "create_calendar_event",
        "Create an event in the user's calendar and invite attendees. Checks for conflicts and "
        "returns the event id and any conflicting events.",
        _obj(
            {
                "title": _s("Event title."),
                "start": _s("Start time, ISO-8601 with time zone."),
                "duration_minutes": _i("Length of the event."),
                "attendees": _arr(
                    _obj({"email": _s("Attendee e-mail."), "optional": _b("Whether attendance is optional.")}, ["email"]),
                    "People to invite.",
                ),
                "visibility": _e("Who can see the details.", ["default", "public", "private"]),
            },
            ["title", "start", "duration_minutes"],
        ),
    ),
    _tool(
        "send_email",
        "Send an e-mail from the user's account. Drafts longer than 2,000 words are refused.",
        _obj(
            {
                "to": _arr(_s("Recipient address."), "Recipients."),
                "subject": _s("Subject line."),
                "body": _s("Plain-text body.", 120),
                "importance": _e("Importance flag.", ["low", "normal", "high"]),
            },
            ["to", "subject", "body"],
        ),
    ),
    _tool(
        "lookup_customer",
        "Find a customer account by e-mail, account id or company name; returns plan, seats, "
        "billing status and the account owner.",
        _obj(
            {
                "by": _e("Which key to search by.", ["email", "account_id", "company"]),
                "value": _s("The value to look up."),
                "include": _arr(_e("Extra section.", ["invoices", "tickets", "usage", "contacts"]), "Extra sections to include."),
            },
            ["by", "value"],
        ),
    ),
    _tool(
        "issue_refund",
        "Refund part or all of an invoice. Refunds above 500 USD need a reason and are reviewed by "
        "finance before they are paid out.",
        _obj(
            {
                "invoice_id": _s("Invoice identifier, e.g. INV-2024-0042."),
                "amount": _obj({"value": _i("Amount in cents."), "currency": _e("Currency.", ["USD", "EUR", "GBP"])},
                               ["value", "currency"], "How much to refund."),
                "reason": _e("Why.", ["duplicate", "service_outage", "billing_error", "goodwill", "other"]),
            },
            ["invoice_id", "amount", "reason"],
        ),
    ),
    _tool(
        "get_service_metrics",
        "Read time series from the monitoring system for one service: latency percentiles, error "
        "rate, saturation. Resolution adapts to the window.",
        _obj(
            {
                "service": _s("Service name as registered in the service catalog."),
                "metric": _e("Which metric.", ["latency_p50", "latency_p99", "error_rate", "requests_per_second", "cpu", "memory"]),
                "window": _e("Time window, ending now.", ["15m", "1h", "6h", "24h", "7d"]),
                "group_by": _arr(_e("Dimension.", ["region", "endpoint", "status_code", "version"]), "Split the series by."),
            },
            ["service", "metric", "window"],
        ),
    ),
    _tool(
        "deploy_service",
        "Roll out a build of a service to an environment with a chosen strategy. Production "
        "deploys need a change ticket and are paused outside business hours.",
        _obj(
            {
                "service": _s("Service name."),
                "version": _s("Build tag or commit sha."),
                "environment": _e("Target environment.", ["dev", "staging", "production"]),
                "strategy": _obj(
                    {
                        "kind": _e("Rollout kind.", ["rolling", "canary", "blue_green"]),
                        "canary_percent": _i("Traffic share for the canary step."),
                        "auto_rollback": _b("Roll back automatically when error rate rises."),
                    },
                    ["kind"],
                    "How to roll out.",
                ),
                "change_ticket": _s("Change-management ticket id."),
            },
            ["service", "version", "environment"],
        ),
    ),
    _tool(
        "list_pull_requests",
        "List pull requests of a repository, newest first, with their review and CI status.",
        _obj(
            {
                "repository": _s("owner/name."),
                "state": _e("Which ones.", ["open", "merged", "closed", "all"]),
                "author": _s("Only those by this user."),
                "limit": _i("Most to return."),
            },
            ["repository", "state"],
        ),
    ),
    _tool(
        "create_pull_request",
        "Open a pull request from the staged changes with a title, description and reviewers.",
        _obj(
            {
                "title": _s("Title."),
                "description": _s("Markdown description."),
                "base_branch": _s("Branch to merge into."),
                "reviewers": _arr(_s("User name."), "Requested reviewers."),
                "draft": _b("Open as a draft."),
            },
            ["title", "base_branch"],
        ),
    ),
    _tool(
        "translate_text",
        "Translate text between languages, keeping formatting and placeholders intact.",
        _obj(
            {
                "text": _s("Text to translate."),
                "source_language": _e("Language of the text.", ["auto", "en", "de", "fr", "es", "ja", "zh"]),
                "target_language": _e("Language to translate into.", ["en", "de", "fr", "es", "ja", "zh"]),
                "formality": _e("Register.", ["default", "formal", "informal"]),
            },
            ["text", "target_language"],
        ),
    ),
    _tool(
        "book_flight",
        "Search and book a flight. Returns the booking reference and the fare; books only within "
        "the travel policy (economy under 6 hours).",
        _obj(
            {
                "origin": _s("IATA code of the departure airport."),
                "destination": _s("IATA code of the arrival airport."),
                "date": _s("Departure date, YYYY-MM-DD."),
                "passengers": _arr(
                    _obj({"name": _s("Full name."), "type": _e("Passenger type.", ["adult", "child", "infant"])}, ["name", "type"]),
                    "Who flies.",
                ),
                "cabin": _e("Cabin class.", ["economy", "premium_economy", "business"]),
            },
            ["origin", "destination", "date", "cabin"],
        ),
    ),
    _tool(
        "get_stock_quote",
        "Latest quote and daily change for a ticker symbol, delayed by 15 minutes.",
        _obj(
            {
                "symbol": _s("Ticker symbol."),
                "exchange": _e("Exchange.", ["NASDAQ", "NYSE", "LSE", "XETRA", "TSE"]),
            },
            ["symbol"],
        ),
    ),
    _tool(
        "summarize_logs",
        "Cluster and summarize log lines of a service over a time window: top error messages, "
        "their counts and first occurrence.",
        _obj(
            {
                "service": _s("Service name."),
                "level": _e("Lowest level to include.", ["debug", "info", "warning", "error"]),
                "window": _e("Time window, ending now.", ["15m", "1h", "6h", "24h"]),
                "filters": _arr(_obj({"field": _s("Log field."), "equals": _s("Value.")}, ["field", "equals"]), "Field filters."),
            },
            ["service", "level", "window"],
        ),
    ),
    _tool(
        "create_support_ticket",
        "Escalate a customer problem to the support queue with severity and the affected product "
        "area; the customer gets an acknowledgement e-mail.",
        _obj(
            {
                "customer_email": _s("Customer e-mail."),
                "severity": _e("Severity.", ["low", "medium", "high", "critical"]),
                "area": _e("Product area.", ["billing", "login", "api", "dashboard", "mobile", "integrations"]),
                "summary": _s("What the customer reported."),
            },
            ["customer_email", "severity", "area", "summary"],
        ),
    ),
    _tool(
        "schedule_job",
        "Schedule a recurring background job with a cron expression; returns the job id and the "
        "next three run times.",
        _obj(
            {
                "name": _s("Job name."),
                "cron": _s("Cron expression, five fields."),
                "task": _obj({"type": _e("Task type.", ["http_call", "sql", "script"]), "target": _s("URL, query or script path.")},
                             ["type", "target"], "What to run."),
                "notify_on_failure": _b("Page the owner when a run fails."),
            },
            ["name", "cron", "task"],
        ),
    ),
    _tool(
        "fetch_url",
        "Fetch a web page through the proxy and return its readable text (scripts and styles "
        "removed), truncated to 8,000 characters.",
        _obj(
            {
                "url": _s("Absolute http(s) URL."),
                "format": _e("How to return the page.", ["text", "markdown", "html"]),
            },
            ["url"],
        ),
    ),
    _tool(
        "manage_feature_flag",
        "Read or change a feature flag: turn it on or off per environment or roll it out to a "
        "percentage of users.",
        _obj(
            {
                "flag": _s("Flag key."),
                "action": _e("What to do.", ["get", "enable", "disable", "rollout"]),
                "environment": _e("Environment.", ["dev", "staging", "production"]),
                "rollout_percent": _i("Share of users for 'rollout'."),
            },
            ["flag", "action", "environment"],
        ),
    ),
]

TOOL_NAMES = [t["function"]["name"] for t in TOOL_POOL]
