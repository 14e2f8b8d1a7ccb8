/*
 * npcd_client: the C ABI of the npcd game client.
 *
 * One client owns one connection to the daemon and one long-lived Session
 * stream. It reconnects by itself (exponential backoff) when the daemon
 * restarts. Nothing ever calls back into the game: the game calls
 * npcd_poll() once per frame and gets the events that arrived since.
 *
 * Requests submitted and cancels issued between two polls go out together as
 * one Tick, when npcd_poll() (or npcd_flush()) runs; a frame over
 * NPCD_MAX_REQUEST_BYTES is split across several Ticks, in order.
 *
 * Every request ends with exactly one terminal event: FINISHED or ERROR.
 * STARTED, TEXT_DELTA, EMOTION, ACTION and SENTENCE events come before it;
 * nothing comes after it.
 * A request in flight when the connection drops ends with ERROR 14
 * (UNAVAILABLE); so does a request flushed while the client is
 * DISCONNECTED (it was connected and lost the connection). A request
 * flushed while the client is still CONNECTING (it never was connected) waits
 * in a bounded queue and goes out once connected; see npcd_client_options.
 *
 * Strings are UTF-8 and NUL-terminated. Strings passed in are copied.
 * Malformed UTF-8 is refused with NPCD_ERR_INVALID_UTF8, never repaired:
 * overlong forms, code points above U+10FFFF, and UTF-16 surrogates encoded
 * on their own (CESU-8 / WTF-8: ED A0..BF xx). A NUL-terminated string cannot
 * carry an embedded NUL; callers that hold a string with its length (C#,
 * Unreal) check it first with npcd_check_utf8(), which refuses one with
 * NPCD_ERR_EMBEDDED_NUL.
 * The functions taking a client are not thread-safe against each other:
 * call them from one thread (the game thread), or serialize the calls.
 */
#ifndef NPCD_CLIENT_H
#define NPCD_CLIENT_H

#include <stdint.h>

#if defined(_WIN32)
#  if defined(NPCD_CLIENT_BUILD)
#    define NPCD_API __declspec(dllexport)
#  else
#    define NPCD_API __declspec(dllimport)
#  endif
#else
#  define NPCD_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef struct npcd_client npcd_client;
typedef struct npcd_request npcd_request;

typedef enum npcd_status {
    NPCD_OK = 0,
    NPCD_ERR_INVALID_ARGUMENT = 1, /* NULL, empty where a value is needed, or out of range */
    NPCD_ERR_DUPLICATE_ID = 2,     /* a request with this id is pending or in flight */
    NPCD_ERR_UNKNOWN_REQUEST = 3,  /* no pending or in-flight request has this id */
    NPCD_ERR_INVALID_UTF8 = 4,     /* malformed UTF-8, including a lone surrogate (ED A0..BF xx) */
    NPCD_ERR_EMBEDDED_NUL = 5,     /* npcd_check_utf8: a NUL byte inside the given length */
    NPCD_ERR_INVALID_ADDRESS = 6,  /* npcd_client_new*: the address does not parse */
    NPCD_ERR_TOO_LARGE = 7,        /* npcd_submit: the request is over NPCD_MAX_REQUEST_BYTES serialized */
    NPCD_ERR_RPC = 8               /* npcd_list_personas: the daemon did not answer (the gRPC code is given) */
} npcd_status;

/*
 * The most bytes one request may take serialized (protobuf) on the wire: gRPC's
 * default maximum message size (4 MiB, 4194304 bytes, which the daemon keeps)
 * less 16 KiB for the Tick around it. npcd_submit refuses a larger request
 * with NPCD_ERR_TOO_LARGE and sends nothing; a frame whose requests and
 * cancels together are larger goes out as several Ticks, in order, each
 * under the limit, in the same flush.
 */
#define NPCD_MAX_REQUEST_BYTES (4194304u - 16384u)

typedef enum npcd_event_kind {
    NPCD_EVENT_STARTED = 1,
    NPCD_EVENT_TEXT_DELTA = 2,
    NPCD_EVENT_FINISHED = 3,
    NPCD_EVENT_ERROR = 4,
    /* Structured lines only, after some TEXT_DELTAs and before FINISHED, each
     * at most once, as soon as its value is complete: */
    NPCD_EVENT_ACTION = 5,  /* action_name, action_args_json */
    NPCD_EVENT_EMOTION = 6, /* emotion */
    /* The daemon refused a new request because a line with the same id is still
     * running in this session (text: its message). NOT an end: the running line's
     * events go on and its terminal event still comes. The client already refuses
     * an id that is pending or in flight (NPCD_ERR_DUPLICATE_ID), so this is rare
     * (e.g. two processes sharing one id space on one session). */
    NPCD_EVENT_DUPLICATE = 7,
    /* Lines with a segmentation (npcd_request_set_segmentation): a sentence (or
     * clause) of the line, complete, for text-to-speech: text, sentence_index.
     * Each comes right after the TEXT_DELTA that completed it, the last one
     * right before FINISHED; their texts, in index order, add up to FINISHED's
     * text exactly (spaces included; a piece ends with the spaces after it). */
    NPCD_EVENT_SENTENCE = 8
} npcd_event_kind;

/* The same numbers as npcd.v1.FinishReason. */
typedef enum npcd_finish_reason {
    NPCD_FINISH_UNSPECIFIED = 0,
    NPCD_FINISH_STOP = 1,
    NPCD_FINISH_LENGTH = 2,
    NPCD_FINISH_CANCELLED = 3,
    NPCD_FINISH_DEADLINE = 4,
    NPCD_FINISH_PREEMPTED = 5   /* an ambient line ended early (its text so far) so a player line could start */
} npcd_finish_reason;

/* The same numbers as npcd.v1.Priority. */
typedef enum npcd_priority {
    NPCD_PRIORITY_AMBIENT = 1,
    NPCD_PRIORITY_PLAYER = 2
} npcd_priority;

/* The same numbers as npcd.v1.Segmentation: which SENTENCE events a line sends. */
typedef enum npcd_segmentation {
    NPCD_SEGMENTATION_NONE = 0,     /* none (the default) */
    NPCD_SEGMENTATION_SENTENCE = 1, /* one per sentence (. ! ? and their CJK, Arabic, Hindi kin) */
    NPCD_SEGMENTATION_CLAUSE = 2    /* also at clause marks (, ; : and kin): shorter pieces, an earlier first one */
} npcd_segmentation;

typedef enum npcd_connection_state {
    /* It was connected and lost the connection; reconnecting with backoff.
     * Requests flushed now end with ERROR 14 (UNAVAILABLE) at once. */
    NPCD_DISCONNECTED = 0,
    /* Never connected yet (the first attempts since npcd_client_new). Requests
     * flushed now wait in the connect queue (npcd_client_options). */
    NPCD_CONNECTING = 1,
    NPCD_CONNECTED = 2
} npcd_connection_state;

/*
 * One event. The strings stay valid until the next npcd_poll() or
 * npcd_client_free() on the same client; copy what you keep. No string is
 * ever NULL: a field an event does not carry is "".
 *
 * The fields after total_ms came with structured output, retry_after_ms
 * after them, then sentence_index, cached_prompt_tokens and history_turns;
 * new fields are only ever appended, so the offsets of the earlier ones stay.
 */
typedef struct npcd_event {
    const char *request_id;
    const char *text;         /* TEXT_DELTA: the new text; SENTENCE: the sentence; FINISHED: the whole line;
                                 ERROR, DUPLICATE: the message */
    const char *error_status; /* ERROR: the status name, e.g. "UNAVAILABLE"; otherwise "" */
    int32_t kind;             /* npcd_event_kind */
    int32_t finish_reason;    /* FINISHED: npcd_finish_reason */
    int32_t error_code;       /* ERROR: a gRPC status code */
    uint32_t queue_position;  /* STARTED: requests waiting ahead of this one */
    uint32_t prompt_tokens;   /* FINISHED */
    uint32_t completion_tokens;
    float queued_ms;
    float first_token_ms;
    float total_ms;
    /* Structured lines (npcd_request_set_structured, _add_action, _set_response_format): */
    const char *json;             /* FINISHED: the whole reply, a JSON object; otherwise "" */
    const char *action_name;      /* ACTION: the action the NPC takes; FINISHED: the same, "" when the reply has none */
    const char *action_args_json; /* ACTION, and FINISHED with an action: its arguments, a JSON object ("{}" when
                                     it takes none); otherwise "" */
    const char *emotion;          /* EMOTION: the label; FINISHED: the same, "" when the reply has none */
    uint32_t retry_after_ms;      /* ERROR 8 (RESOURCE_EXHAUSTED): the daemon's estimate of when to try
                                     again, in ms; 0 otherwise */
    uint32_t sentence_index;      /* SENTENCE: 0, 1, 2 ... within the line; otherwise 0 */
    uint32_t cached_prompt_tokens; /* FINISHED: prompt tokens whose keys and values the daemon reused (the
                                      persona's prompt, the conversation so far) */
    uint32_t history_turns;       /* FINISHED: earlier turns the prompt held (the conversation's or the
                                     request's history, after the persona's prompt budget) */
} npcd_event;

/*
 * How to connect. Fill it with npcd_client_options_init() first, then set
 * what you need. struct_size tells the library how much of the struct the
 * caller knows: fields appended later are read only when struct_size covers
 * them (else they take their defaults); a size below this first version's is
 * refused. Bindings that do not use the header (C#) set struct_size to their
 * own size of the struct and zero the rest.
 */
typedef struct npcd_client_options {
    uint32_t struct_size;        /* sizeof(npcd_client_options); set by _init */
    uint32_t initial_backoff_ms; /* 0: 250 */
    uint32_t max_backoff_ms;     /* 0: 5000 */
    /* Requests flushed while CONNECTING wait for the first connection: at most
     * connect_queue_max of them (0: 64; more end with ERROR 8 RESOURCE_EXHAUSTED),
     * each at most connect_queue_timeout_ms (0: 10000; then ERROR 14 UNAVAILABLE
     * naming the timeout). */
    uint32_t connect_queue_max;
    uint32_t connect_queue_timeout_ms;
    int32_t tls;                 /* != 0: TLS; 0: plaintext (loopback only, please) */
    const char *address;         /* "host:port", "[v6]:port", or a gRPC URI (dns:, ipv4:, ipv6:, unix:) */
    /* NULL or "": no token. Else sent as "authorization: Bearer <token>" on
     * every call; printable ASCII without spaces. */
    const char *token;
    /* TLS: the PEM root certificates the server's certificate is checked
     * against; NULL or "": the system's roots. */
    const char *root_certs_pem;
    /* TLS, mutual: the client's certificate chain and private key (PEM), both or neither. */
    const char *client_cert_pem;
    const char *client_key_pem;
    /* TLS: the name the server's certificate must carry when it differs from
     * the address's host (e.g. "localhost" for 127.0.0.1); NULL or "": the host. */
    const char *tls_server_name;
} npcd_client_options;

/*
 * A client for the daemon at `address` ("host:port"). Connects in the
 * background; never blocks. Backoff between connection attempts starts at
 * initial_backoff_ms and doubles up to max_backoff_ms (0 picks 250 and 5000).
 * Plaintext, no token; the same as npcd_client_new_with_options with only
 * these set. Returns NULL at once when address is NULL, empty, or does not
 * parse ("no-port", "host:notaport", port 0 or above 65535); npcd_last_error()
 * then says why.
 */
NPCD_API npcd_client *npcd_client_new(const char *address, uint32_t initial_backoff_ms,
                                      uint32_t max_backoff_ms);
/* The defaults: struct_size set (to this header's size of the struct), everything else
 * 0 / NULL. Inline on purpose: a newer library never writes past an older caller's struct. */
static inline void npcd_client_options_init(npcd_client_options *options) {
    options->struct_size = (uint32_t)sizeof(npcd_client_options);
    options->initial_backoff_ms = 0;
    options->max_backoff_ms = 0;
    options->connect_queue_max = 0;
    options->connect_queue_timeout_ms = 0;
    options->tls = 0;
    options->address = 0;
    options->token = 0;
    options->root_certs_pem = 0;
    options->client_cert_pem = 0;
    options->client_key_pem = 0;
    options->tls_server_name = 0;
}
/*
 * A client as the options say (copied; the strings may be freed on return).
 * Returns NULL when they are refused; then *status_out (when status_out is not
 * NULL) is NPCD_ERR_INVALID_ADDRESS, _INVALID_UTF8 or _INVALID_ARGUMENT, and
 * npcd_last_error() says which field and why.
 */
NPCD_API npcd_client *npcd_client_new_with_options(const npcd_client_options *options,
                                                   npcd_status *status_out);
/*
 * Why the last npcd_client_new*, npcd_request_new, npcd_submit, npcd_list_personas or
 * npcd_check_utf8 call on this thread failed ("" when it did not). Valid until the next such call on
 * the same thread.
 */
NPCD_API const char *npcd_last_error(void);
/*
 * Checks `length` bytes (a NUL inside them is refused, none is needed at the
 * end): NPCD_OK, NPCD_ERR_EMBEDDED_NUL or NPCD_ERR_INVALID_UTF8 (with the byte
 * offset in npcd_last_error()). s may be NULL only when length is 0.
 */
NPCD_API npcd_status npcd_check_utf8(const char *s, uint64_t length);
/* Closes the stream and joins the client's threads. NULL is ignored. */
NPCD_API void npcd_client_free(npcd_client *client);
NPCD_API int32_t npcd_client_state(const npcd_client *client);

/*
 * A request builder: the NPC of persona `persona` answers `line`.
 * Gets a process-unique request id, readable with npcd_request_id().
 * Returns NULL when persona is NULL or empty, or line is NULL, or either is
 * not valid UTF-8; npcd_last_error() says which. The setters below return
 * NPCD_ERR_INVALID_ARGUMENT for a NULL request or a NULL (or required but
 * empty) string, NPCD_ERR_INVALID_UTF8 for malformed UTF-8; a refused call
 * changes nothing.
 */
NPCD_API npcd_request *npcd_request_new(const char *persona, const char *line);
NPCD_API void npcd_request_free(npcd_request *request);
/* The id; valid while the request lives. */
NPCD_API const char *npcd_request_id(const npcd_request *request);
NPCD_API npcd_status npcd_request_set_id(npcd_request *request, const char *request_id);
NPCD_API npcd_status npcd_request_set_npc_id(npcd_request *request, const char *npc_id);
NPCD_API npcd_status npcd_request_set_speaker(npcd_request *request, const char *speaker);
NPCD_API npcd_status npcd_request_add_history(npcd_request *request, const char *speaker,
                                              const char *text);
NPCD_API npcd_status npcd_request_set_context(npcd_request *request, const char *key,
                                              const char *value);
NPCD_API npcd_status npcd_request_set_priority(npcd_request *request, int32_t priority);
/* npcd_segmentation: SENTENCE events for text-to-speech; another value is
 * NPCD_ERR_INVALID_ARGUMENT. */
NPCD_API npcd_status npcd_request_set_segmentation(npcd_request *request, int32_t segmentation);
/* The conversation this line belongs to (often the npc id): the daemon keeps its
 * turns, puts the earlier ones in the prompt instead of the history (which then
 * holds only lines said since) and appends this line and the reply when it
 * finishes. "" clears it. */
NPCD_API npcd_status npcd_request_set_conversation(npcd_request *request, const char *conversation);
NPCD_API npcd_status npcd_request_set_deadline_ms(npcd_request *request, uint32_t deadline_ms);
/* Sampling overrides; what is not set takes the persona's defaults. */
NPCD_API npcd_status npcd_request_set_max_tokens(npcd_request *request, uint32_t max_tokens);
NPCD_API npcd_status npcd_request_set_temperature(npcd_request *request, float temperature);
NPCD_API npcd_status npcd_request_set_top_p(npcd_request *request, float top_p);
NPCD_API npcd_status npcd_request_set_top_k(npcd_request *request, uint32_t top_k);
NPCD_API npcd_status npcd_request_set_repetition_penalty(npcd_request *request, float penalty);
NPCD_API npcd_status npcd_request_set_seed(npcd_request *request, uint64_t seed);
NPCD_API npcd_status npcd_request_add_stop(npcd_request *request, const char *stop);

/*
 * Structured output: the reply is a JSON object {"say": ..., "emotion": ...,
 * "action": {"name": ..., "args": {...}}}, decoded under a grammar so that it
 * always parses and holds only declared emotions, actions and arguments.
 * "say" streams as TEXT_DELTAs (FINISHED's text is the spoken line), then
 * EMOTION and ACTION events arrive; FINISHED carries them again with the JSON.
 */
/* on != 0: reply with the persona's emotions and actions; 0: free text (unless
 * an action list or a response format is set). */
NPCD_API npcd_status npcd_request_set_structured(npcd_request *request, int32_t on);
/*
 * Adds an action valid right now; once any is added, the reply may take only the
 * listed actions, not the persona's others (and the request is structured).
 * Only a name (description and args_schema_json NULL or ""): the persona's action
 * of that name. With a description or an arguments schema (a JSON Schema of an
 * object, as JSON text): a new action, used as given. The daemon checks the name
 * ([a-z][a-z0-9_]*, at most 64 characters) and the schema; a bad one ends the
 * request with ERROR 3 (INVALID_ARGUMENT) naming the field.
 */
NPCD_API npcd_status npcd_request_add_action(npcd_request *request, const char *name,
                                             const char *description,
                                             const char *args_schema_json);
/* A JSON Schema (JSON text) the reply follows instead of the persona's reply shape;
 * its fields come back in FINISHED's json (its top-level string "say", if any,
 * streams as text). "" clears it. */
NPCD_API npcd_status npcd_request_set_response_format(npcd_request *request,
                                                      const char *schema_json);

/*
 * Queues a copy of the request for the next Tick; the builder may be freed
 * or reused (after npcd_request_set_id) right away. NPCD_ERR_DUPLICATE_ID
 * when its id is pending or in flight; NPCD_ERR_TOO_LARGE (npcd_last_error()
 * names its size and the limit) when it is over NPCD_MAX_REQUEST_BYTES
 * serialized: then nothing is queued or sent, and the session goes on.
 */
NPCD_API npcd_status npcd_submit(npcd_client *client, const npcd_request *request);
/*
 * Cancels a request. Still pending (not flushed): it is dropped and ends
 * with FINISHED / CANCELLED at the next poll. In flight: the cancel goes out
 * with the next Tick and the daemon ends the request.
 */
NPCD_API npcd_status npcd_cancel(npcd_client *client, const char *request_id);
/* Sends the pending requests and cancels now, as one Tick (several, in order,
 * when together they are over NPCD_MAX_REQUEST_BYTES). */
NPCD_API void npcd_flush(npcd_client *client);
/*
 * Flushes, then copies up to `max` of the events that arrived since the
 * last poll into events_out, oldest first. Returns how many; the rest wait
 * for the next call.
 */
NPCD_API int32_t npcd_poll(npcd_client *client, npcd_event *events_out, int32_t max);

/* The same numbers as npcd.v1.LoadStatus. */
typedef enum npcd_persona_status {
    NPCD_PERSONA_READY = 1,
    NPCD_PERSONA_ERROR = 2,    /* no good version could ever be loaded: error says why */
    NPCD_PERSONA_STALE = 3,    /* its file's last edit is invalid; the last good version serves */
    NPCD_PERSONA_RETIRING = 4  /* its file was deleted; running lines finish */
} npcd_persona_status;

/* One persona as the daemon serves it. Strings are never NULL. */
typedef struct npcd_persona {
    const char *id;            /* what npcd_request_new takes */
    const char *display_name;
    const char *description;
    const char *metadata_json; /* the persona's game-facing metadata (voice_id, emotion_tags, ...) as a JSON
                                  object, "{}" when it has none */
    const char *error;         /* the last load error, naming file, line and field; "" when none */
    int32_t status;            /* npcd_persona_status */
    int32_t has_adapter;       /* 1 when it runs with its own LoRA adapter, 0 on the base model */
} npcd_persona;

typedef struct npcd_persona_list npcd_persona_list;

/*
 * The daemon's personas, for an editor's dropdown or a loading screen: a blocking call of
 * at most timeout_ms (0: 5000), on its own connection attempt if the Session is not up, so
 * not one to make every frame. NPCD_OK with *list_out set (free it with
 * npcd_persona_list_free); NPCD_ERR_INVALID_ARGUMENT for a NULL client or list_out;
 * NPCD_ERR_RPC when the daemon did not answer in time or refused (*rpc_code_out, when not
 * NULL, is the gRPC code: 14 UNAVAILABLE, 4 DEADLINE_EXCEEDED, 16 UNAUTHENTICATED, ...;
 * npcd_last_error() says more). Lines in flight are not affected.
 */
NPCD_API npcd_status npcd_list_personas(npcd_client *client, uint32_t timeout_ms, npcd_persona_list **list_out,
                                        int32_t *rpc_code_out);
NPCD_API int32_t npcd_persona_list_count(const npcd_persona_list *list);
/* Persona `index` (0 .. count - 1), in the daemon's order (by id); NULL outside that range.
 * Valid until the list is freed. */
NPCD_API const npcd_persona *npcd_persona_list_get(const npcd_persona_list *list, int32_t index);
/* NULL is ignored. */
NPCD_API void npcd_persona_list_free(npcd_persona_list *list);

/*
 * What every NPC remembers, for the game's save file. The daemon keeps conversations (a
 * request's npcd_request_set_conversation) across its restarts; a save game carries them with
 * it: npcd_export_conversations when saving, npcd_import_conversations(replace = 1) when
 * loading, so each NPC remembers what it had said in that save. Blocking calls like
 * npcd_list_personas (at most timeout_ms, 0: 5000; NPCD_ERR_RPC with *rpc_code_out, when not
 * NULL, the gRPC code; npcd_last_error() says more); lines in flight are not affected.
 *
 * npcd_export_conversations: the conversations of this client (of `persona` only, unless it
 * is NULL or ""), as one opaque blob: NPCD_OK with *blob_out set (free it with
 * npcd_blob_free). Store its bytes as they are.
 */
typedef struct npcd_blob npcd_blob;
NPCD_API npcd_status npcd_export_conversations(npcd_client *client, const char *persona, uint32_t timeout_ms,
                                               npcd_blob **blob_out, int32_t *rpc_code_out);
/* The blob's bytes (valid until it is freed) and their count; how many conversations it holds. */
NPCD_API const uint8_t *npcd_blob_data(const npcd_blob *blob);
NPCD_API uint64_t npcd_blob_size(const npcd_blob *blob);
NPCD_API uint32_t npcd_blob_conversations(const npcd_blob *blob);
/* NULL is ignored. */
NPCD_API void npcd_blob_free(npcd_blob *blob);
/*
 * Restores an exported blob. replace = 1 (loading a save game): this client's conversations
 * become exactly the blob's; 0: the blob's are added, replacing those with the same ids.
 * *imported_out (when not NULL): how many it held. A corrupt or foreign blob is refused by the
 * daemon with NPCD_ERR_RPC and code 3 (INVALID_ARGUMENT), and nothing it stored is lost; a
 * blob over NPCD_MAX_REQUEST_BYTES gets NPCD_ERR_TOO_LARGE and is not sent.
 */
NPCD_API npcd_status npcd_import_conversations(npcd_client *client, const uint8_t *data, uint64_t size,
                                               int32_t replace, uint32_t timeout_ms, uint32_t *imported_out,
                                               int32_t *rpc_code_out);
/* Forgets one conversation (the NPC starts afresh): its id and persona, as the lines gave them. */
NPCD_API npcd_status npcd_reset_conversation(npcd_client *client, const char *conversation, const char *persona,
                                             uint32_t timeout_ms, int32_t *rpc_code_out);

/* One turn of a conversation, oldest first. Strings are never NULL. */
typedef struct npcd_turn {
    const char *speaker;
    const char *text;
    int32_t npc; /* 1: said by this conversation's NPC (its replies), 0: by a player or another NPC */
} npcd_turn;

typedef struct npcd_conversation npcd_conversation;

/*
 * What one NPC remembers, for a journal or a quest log: every turn of the conversation
 * (prompts hold the newest that fit) and, for a persona that summarises, what the dropped
 * turns said. NPCD_OK with *conversation_out set (free it with npcd_conversation_free); an
 * unknown conversation is an empty one. Blocking, as above.
 */
NPCD_API npcd_status npcd_get_conversation(npcd_client *client, const char *conversation, const char *persona,
                                           uint32_t timeout_ms, npcd_conversation **conversation_out,
                                           int32_t *rpc_code_out);
NPCD_API int32_t npcd_conversation_turn_count(const npcd_conversation *conversation);
/* Turn `index` (0 .. count - 1); NULL outside that range. Valid until the conversation is freed. */
NPCD_API const npcd_turn *npcd_conversation_turn(const npcd_conversation *conversation, int32_t index);
/* "" when there is none. */
NPCD_API const char *npcd_conversation_summary(const npcd_conversation *conversation);
/* NULL is ignored. */
NPCD_API void npcd_conversation_free(npcd_conversation *conversation);
/*
 * Adds a turn the NPC should remember without a line of its own: what the player told
 * another NPC nearby, an event of the game ("The bell rang twice."), or, with npc = 1, words
 * the game puts in the NPC's mouth. The daemon refuses an unknown persona (code 5) and
 * over-long text (code 3, naming the field).
 */
NPCD_API npcd_status npcd_add_turn(npcd_client *client, const char *conversation, const char *persona,
                                   const char *speaker, const char *text, int32_t npc, uint32_t timeout_ms,
                                   int32_t *rpc_code_out);
/*
 * Replaces what the NPC remembers with the game's own edit: `count` turns, oldest first (turns may
 * be NULL when count is 0), and a summary of what came before them ("" or NULL: none). A game
 * rewrites a memory after a quest changes the story, trims what the player should not have said,
 * or moves a conversation to another NPC. Unlike npcd_reset_conversation the conversation is kept,
 * even when empty. The daemon refuses (NPCD_ERR_RPC, code 3) more turns or longer text than its
 * limits allow, naming the field; nothing stored changes then.
 */
NPCD_API npcd_status npcd_set_conversation(npcd_client *client, const char *conversation, const char *persona,
                                           const npcd_turn *turns, int32_t count, const char *summary,
                                           uint32_t timeout_ms, int32_t *rpc_code_out);

#ifdef __cplusplus
}
#endif

#endif /* NPCD_CLIENT_H */
