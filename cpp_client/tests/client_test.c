/*
 * Tests of the C ABI against a real daemon. One flow per run:
 *
 *   npcd_client_test stream|tick|cancel|structured|large|personas
 *                                         needs NPCD_TEST_ADDR (a running daemon); structured
 *                                         also a persona "merchant" that declares emotions
 *                                         and actions
 *   npcd_client_test restart              needs NPCD_TEST_DAEMON_CMD (starts a daemon in
 *                                         the foreground) and NPCD_TEST_RESTART_ADDR (its address)
 *   npcd_client_test busy                 needs NPCD_TEST_BUSY_ADDR: a daemon with max_queue 1
 *   npcd_client_test offline              needs no daemon: address, option and UTF-8 checks,
 *                                         and the connect queue against a closed port
 *   npcd_client_test secure               needs NPCD_TEST_SECURE_ADDR: a daemon serving mutual TLS
 *                                         with a token (NPCD_TEST_TOKEN), its CA (NPCD_TEST_CA_PEM)
 *                                         and a client certificate and key (NPCD_TEST_CLIENT_CERT,
 *                                         NPCD_TEST_CLIENT_KEY): PEM file paths
 *
 * All flows need NPCD_TEST_PERSONAS: comma-separated persona ids.
 * Exits 0 on success, 1 on failure, 77 (skipped) when the environment is missing.
 */
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "npcd_client.h"

#define MAX_LINES 80
#define MAX_PERSONAS 16
#define TEXT_CAP 4096
#define NAME_CAP 128

/* The persona of the structured flow: it must declare emotions and actions. */
#define STRUCTURED_PERSONA "merchant"

static void fail(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "FAIL: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

#define CHECK(cond, ...) \
    do {                 \
        if (!(cond)) fail(__VA_ARGS__); \
    } while (0)

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

/* What the test saw of one request, checked event by event. */
typedef struct line {
    char id[64];
    int started;
    int deltas;
    int done;          /* 0, NPCD_EVENT_FINISHED or NPCD_EVENT_ERROR */
    int finish_reason;
    int error_code;
    unsigned retry_after_ms;
    int duplicates;          /* DUPLICATE events (not an end) */
    unsigned completion_tokens;
    char text[TEXT_CAP];     /* the deltas, concatenated */
    char finished[TEXT_CAP]; /* FINISHED text or ERROR message */
    /* structured lines */
    int actions;             /* ACTION events */
    int emotions;            /* EMOTION events */
    int deltas_before_action;
    int deltas_before_emotion;
    char action_name[NAME_CAP];  /* of the ACTION event */
    char action_args[TEXT_CAP];
    char emotion[NAME_CAP];      /* of the EMOTION event */
    char json[TEXT_CAP];         /* FINISHED */
    char finished_action_name[NAME_CAP];
    char finished_action_args[TEXT_CAP];
    char finished_emotion[NAME_CAP];
    /* segmented lines (npcd_request_set_segmentation) */
    int segmented;           /* set by the test: SENTENCE events are expected */
    int sentences;           /* SENTENCE events */
    size_t sentence_len;     /* of their texts together, each matched against the deltas (no copy: a
                                bigger struct makes the flows' stack frames too big for memcheck) */
    unsigned cached_prompt_tokens;  /* FINISHED */
    unsigned prompt_tokens;
    unsigned history_turns;
} line;

typedef struct lines {
    line items[MAX_LINES];
    int count;
} lines;

static line *track(lines *ls, const char *id) {
    CHECK(ls->count < MAX_LINES, "too many lines");
    line *l = &ls->items[ls->count++];
    memset(l, 0, sizeof *l);
    snprintf(l->id, sizeof l->id, "%s", id);
    return l;
}

static void append(char *dst, const char *src) {
    size_t n = strlen(dst);
    snprintf(dst + n, TEXT_CAP - n, "%s", src);
}

static void copy_to(char *dst, size_t cap, const char *src) {
    CHECK(src != NULL, "a NULL string in an event");
    snprintf(dst, cap, "%s", src);
}

static void on_event(lines *ls, const npcd_event *e) {
    line *l = NULL;
    for (int i = 0; i < ls->count; i++)
        if (strcmp(ls->items[i].id, e->request_id) == 0) l = &ls->items[i];
    CHECK(l != NULL, "event %d for unknown request id '%s'", e->kind, e->request_id);
    CHECK(!l->done, "event %d for %s after its terminal event", e->kind, l->id);
    switch (e->kind) {
    case NPCD_EVENT_STARTED:
        CHECK(!l->started, "second STARTED for %s", l->id);
        l->started = 1;
        break;
    case NPCD_EVENT_TEXT_DELTA:
        CHECK(l->started, "TEXT_DELTA before STARTED for %s", l->id);
        l->deltas++;
        append(l->text, e->text);
        break;
    case NPCD_EVENT_ACTION:
        CHECK(l->started, "ACTION before STARTED for %s", l->id);
        l->actions++;
        l->deltas_before_action = l->deltas;
        copy_to(l->action_name, sizeof l->action_name, e->action_name);
        copy_to(l->action_args, sizeof l->action_args, e->action_args_json);
        break;
    case NPCD_EVENT_SENTENCE:
        CHECK(l->started, "SENTENCE before STARTED for %s", l->id);
        CHECK(e->sentence_index == (unsigned)l->sentences, "%s: SENTENCE %u, want index %d", l->id,
              e->sentence_index, l->sentences);
        CHECK(e->text[0] != 0, "%s: an empty SENTENCE", l->id);
        l->sentences++;
        CHECK(strncmp(l->text + l->sentence_len, e->text, strlen(e->text)) == 0,
              "%s: SENTENCE '%s' is not the next text of the deltas '%s' (after %zu bytes)", l->id, e->text,
              l->text, l->sentence_len);
        l->sentence_len += strlen(e->text);
        break;
    case NPCD_EVENT_EMOTION:
        CHECK(l->started, "EMOTION before STARTED for %s", l->id);
        l->emotions++;
        l->deltas_before_emotion = l->deltas;
        copy_to(l->emotion, sizeof l->emotion, e->emotion);
        break;
    case NPCD_EVENT_FINISHED:
        l->done = NPCD_EVENT_FINISHED;
        l->finish_reason = e->finish_reason;
        l->completion_tokens = e->completion_tokens;
        l->prompt_tokens = e->prompt_tokens;
        l->cached_prompt_tokens = e->cached_prompt_tokens;
        l->history_turns = e->history_turns;
        append(l->finished, e->text);
        copy_to(l->json, sizeof l->json, e->json);
        copy_to(l->finished_action_name, sizeof l->finished_action_name, e->action_name);
        copy_to(l->finished_action_args, sizeof l->finished_action_args, e->action_args_json);
        copy_to(l->finished_emotion, sizeof l->finished_emotion, e->emotion);
        break;
    case NPCD_EVENT_DUPLICATE:
        CHECK(e->text[0] != 0, "DUPLICATE without a message for %s", l->id);
        l->duplicates++;
        break;
    case NPCD_EVENT_ERROR:
        l->done = NPCD_EVENT_ERROR;
        l->error_code = e->error_code;
        l->retry_after_ms = e->retry_after_ms;
        CHECK(e->error_code == 8 || e->retry_after_ms == 0, "retry_after_ms %u on ERROR %d for %s",
              e->retry_after_ms, e->error_code, l->id);
        CHECK(e->text[0] != 0, "ERROR without a message for %s", l->id);
        CHECK(e->error_status[0] != 0, "ERROR without a status name for %s", l->id);
        append(l->finished, e->text);
        break;
    default:
        fail("unknown event kind %d", e->kind);
    }
}

/* Polls once per 10 ms "frame" until `until(l)` holds, or fails after timeout_s. */
static void pump_until(npcd_client *c, lines *ls, line *l, int (*until)(const line *),
                       double timeout_s, const char *what) {
    npcd_event events[8]; /* small on purpose: events must carry over between polls */
    double give_up = now_s() + timeout_s;
    for (;;) {
        int n;
        while ((n = npcd_poll(c, events, 8)) > 0)
            for (int i = 0; i < n; i++) on_event(ls, &events[i]);
        if (until(l)) return;
        CHECK(now_s() < give_up, "timed out after %.0f s waiting for %s", timeout_s, what);
        sleep_ms(10);
    }
}

static int is_done(const line *l) { return l->done != 0; }
static int has_delta(const line *l) { return l->deltas > 0 || l->done; }

static void pump_all_done(npcd_client *c, lines *ls, double timeout_s) {
    for (int i = 0; i < ls->count; i++)
        pump_until(c, ls, &ls->items[i], is_done, timeout_s, ls->items[i].id);
}

static void expect_complete_line(const line *l) {
    CHECK(l->done == NPCD_EVENT_FINISHED, "%s ended with ERROR %d: %s", l->id, l->error_code,
          l->finished);
    CHECK(l->started, "%s finished without STARTED", l->id);
    CHECK(l->finish_reason == NPCD_FINISH_STOP || l->finish_reason == NPCD_FINISH_LENGTH,
          "%s finished with reason %d", l->id, l->finish_reason);
    CHECK(l->deltas > 0 && l->text[0] != 0, "%s produced no text", l->id);
    CHECK(strcmp(l->text, l->finished) == 0, "%s: deltas '%s' != finished text '%s'", l->id,
          l->text, l->finished);
    CHECK(l->completion_tokens > 0, "%s: completion_tokens is 0", l->id);
    CHECK(l->cached_prompt_tokens <= l->prompt_tokens, "%s: %u cached of %u prompt tokens", l->id,
          l->cached_prompt_tokens, l->prompt_tokens);
    if (l->segmented) /* each matched the deltas, which are the text: together they are the text */
        CHECK(l->sentences > 0 && l->sentence_len == strlen(l->finished),
              "%s: %d SENTENCE events cover %zu bytes of the finished text '%s'", l->id, l->sentences,
              l->sentence_len, l->finished);
    else
        CHECK(l->sentences == 0, "%s: %d SENTENCE events without a segmentation", l->id, l->sentences);
}

/* A structured line: its say streamed as text, one EMOTION and one ACTION after some text,
 * and FINISHED repeating both with the whole JSON reply. */
static void expect_structured_line(const line *l) {
    expect_complete_line(l);
    CHECK(l->emotions == 1, "%s: want one EMOTION event, got %d", l->id, l->emotions);
    CHECK(l->emotion[0] != 0, "%s: EMOTION with an empty label", l->id);
    CHECK(l->actions == 1, "%s: want one ACTION event, got %d", l->id, l->actions);
    CHECK(l->action_name[0] != 0, "%s: ACTION with an empty name", l->id);
    CHECK(l->action_args[0] == '{', "%s: ACTION args '%s' are not a JSON object", l->id, l->action_args);
    CHECK(l->deltas_before_emotion > 0 && l->deltas_before_action > 0,
          "%s: EMOTION/ACTION before any TEXT_DELTA", l->id);
    CHECK(l->json[0] == '{' && strstr(l->json, "\"say\"") != NULL, "%s: FINISHED json '%s' has no say",
          l->id, l->json);
    CHECK(strstr(l->json, l->emotion) != NULL && strstr(l->json, l->action_name) != NULL,
          "%s: json '%s' lacks emotion '%s' or action '%s'", l->id, l->json, l->emotion, l->action_name);
    CHECK(strcmp(l->finished_emotion, l->emotion) == 0, "%s: FINISHED emotion '%s' != EMOTION '%s'", l->id,
          l->finished_emotion, l->emotion);
    CHECK(strcmp(l->finished_action_name, l->action_name) == 0 &&
              strcmp(l->finished_action_args, l->action_args) == 0,
          "%s: FINISHED action %s %s != ACTION %s %s", l->id, l->finished_action_name,
          l->finished_action_args, l->action_name, l->action_args);
}

static const char *env_or_skip(const char *name) {
    const char *v = getenv(name);
    if (v == NULL || v[0] == 0) {
        fprintf(stderr, "SKIP: %s is not set\n", name);
        exit(77);
    }
    return v;
}

static char personas[MAX_PERSONAS][64];
static int persona_count;

static void load_personas(void) {
    char buf[1024];
    snprintf(buf, sizeof buf, "%s", env_or_skip("NPCD_TEST_PERSONAS"));
    for (char *tok = strtok(buf, ","); tok && persona_count < MAX_PERSONAS; tok = strtok(NULL, ","))
        snprintf(personas[persona_count++], 64, "%s", tok);
    CHECK(persona_count > 0, "NPCD_TEST_PERSONAS names no persona");
}

static npcd_client *connect_to(const char *addr, double timeout_s) {
    npcd_client *c = npcd_client_new(addr, 100, 1000);
    CHECK(c != NULL, "npcd_client_new(%s) returned NULL", addr);
    double give_up = now_s() + timeout_s;
    while (npcd_client_state(c) != NPCD_CONNECTED) {
        CHECK(now_s() < give_up, "not connected to %s after %.0f s", addr, timeout_s);
        sleep_ms(20);
    }
    return c;
}

static npcd_request *make_request(const char *persona, const char *line_text, unsigned max_tokens) {
    npcd_request *r = npcd_request_new(persona, line_text);
    CHECK(r != NULL, "npcd_request_new failed");
    CHECK(npcd_request_set_speaker(r, "Player") == NPCD_OK, "set_speaker");
    CHECK(npcd_request_set_context(r, "location", "the village square") == NPCD_OK, "set_context");
    CHECK(npcd_request_set_max_tokens(r, max_tokens) == NPCD_OK, "set_max_tokens");
    CHECK(npcd_request_set_temperature(r, 0.0f) == NPCD_OK, "set_temperature");
    return r;
}

static line *submit(npcd_client *c, lines *ls, npcd_request *r) {
    line *l = track(ls, npcd_request_id(r));
    CHECK(npcd_submit(c, r) == NPCD_OK, "npcd_submit %s", l->id);
    return l;
}

static line *say(npcd_client *c, lines *ls, const char *persona, const char *text, unsigned max_tokens) {
    npcd_request *r = make_request(persona, text, max_tokens);
    line *l = submit(c, ls, r);
    npcd_request_free(r);
    return l;
}

/* One line streams back in order; argument checks; a pending request cancels locally. */
static void test_stream(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    lines ls = {0};

    CHECK(npcd_request_new(NULL, "x") == NULL, "request without persona accepted");
    CHECK(npcd_request_new("p", "\xff\xfe") == NULL, "non-UTF-8 line accepted");
    CHECK(npcd_client_new("", 0, 0) == NULL, "empty address accepted");

    npcd_request *r = make_request(personas[0], "Good morning! What news today?", 16);
    CHECK(npcd_request_add_history(r, "Player", "Hello there.") == NPCD_OK, "add_history");
    CHECK(npcd_request_set_npc_id(r, "npc-1") == NPCD_OK, "set_npc_id");
    CHECK(npcd_request_set_priority(r, NPCD_PRIORITY_PLAYER) == NPCD_OK, "set_priority");
    CHECK(npcd_request_set_priority(r, 7) == NPCD_ERR_INVALID_ARGUMENT, "bad priority accepted");
    CHECK(npcd_request_set_segmentation(r, 3) == NPCD_ERR_INVALID_ARGUMENT &&
              npcd_request_set_segmentation(r, -1) == NPCD_ERR_INVALID_ARGUMENT &&
              npcd_request_set_segmentation(NULL, NPCD_SEGMENTATION_SENTENCE) == NPCD_ERR_INVALID_ARGUMENT,
          "a bad segmentation accepted");
    CHECK(npcd_request_set_segmentation(r, NPCD_SEGMENTATION_SENTENCE) == NPCD_OK, "set_segmentation");
    line *one = submit(c, &ls, r);
    one->segmented = 1;
    CHECK(npcd_submit(c, r) == NPCD_ERR_DUPLICATE_ID, "duplicate pending id accepted");
    npcd_request_free(r);

    line *dropped = say(c, &ls, personas[0], "Never mind.", 8);
    CHECK(npcd_cancel(c, dropped->id) == NPCD_OK, "cancel of a pending request");
    CHECK(npcd_cancel(c, "no-such-request") == NPCD_ERR_UNKNOWN_REQUEST, "cancel of unknown id");

    line *unknown = say(c, &ls, "no-such-persona", "Hello?", 8);

    pump_all_done(c, &ls, 120);
    expect_complete_line(one);
    CHECK(one->history_turns == 1, "%s: the prompt held %u earlier turns, want the 1 given", one->id,
          one->history_turns);
    CHECK(dropped->done == NPCD_EVENT_FINISHED && dropped->finish_reason == NPCD_FINISH_CANCELLED &&
              !dropped->started && dropped->text[0] == 0,
          "a pending request cancelled locally must end FINISHED/CANCELLED without STARTED");
    CHECK(unknown->done == NPCD_EVENT_ERROR && unknown->error_code == 5,
          "unknown persona: want ERROR 5 (NOT_FOUND), got done=%d code=%d", unknown->done,
          unknown->error_code);
    printf("stream: '%s' (%d deltas, %d sentences)\n", one->finished, one->deltas, one->sentences);
    npcd_client_free(c);
}

/* 16 NPCs over all personas in one frame, so in one Tick. */
static void test_tick(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    lines ls = {0};
    for (int i = 0; i < 16; i++) {
        char text[128], npc[32];
        snprintf(text, sizeof text, "Villager %d asks: how is your day going?", i);
        snprintf(npc, sizeof npc, "npc-%d", i);
        npcd_request *r = make_request(personas[i % persona_count], text, 8);
        CHECK(npcd_request_set_npc_id(r, npc) == NPCD_OK, "set_npc_id");
        submit(c, &ls, r);
        npcd_request_free(r);
    }
    pump_all_done(c, &ls, 240);
    for (int i = 0; i < ls.count; i++) expect_complete_line(&ls.items[i]);
    printf("tick: 16 lines over %d personas finished\n", persona_count);
    npcd_client_free(c);
}

/* Cancel a line after its first text arrived. */
static void test_cancel(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    lines ls = {0};
    line *l = say(c, &ls, personas[0],
                  "Tell me the whole history of this village, every family, in great detail.", 400);
    pump_until(c, &ls, l, has_delta, 120, "the first delta");
    CHECK(!l->done, "the line ended before it could be cancelled");
    CHECK(npcd_cancel(c, l->id) == NPCD_OK, "npcd_cancel of an in-flight request");
    pump_until(c, &ls, l, is_done, 60, "the cancelled line to end");
    CHECK(l->done == NPCD_EVENT_FINISHED && l->finish_reason == NPCD_FINISH_CANCELLED,
          "want FINISHED/CANCELLED, got done=%d reason=%d", l->done, l->finish_reason);
    CHECK(l->completion_tokens < 400, "cancelled line ran to max_tokens");
    CHECK(strcmp(l->text, l->finished) == 0, "deltas '%s' != finished text '%s'", l->text,
          l->finished);
    CHECK(npcd_cancel(c, l->id) == NPCD_ERR_UNKNOWN_REQUEST, "cancel after the end accepted");
    printf("cancel: stopped after %u tokens: '%s'\n", l->completion_tokens, l->finished);
    npcd_client_free(c);
}

/* Structured lines: the persona's emotions and actions, a request's own action list, a
 * response format of the game's, and the argument checks of the new setters. */
static void test_structured(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    lines ls = {0};

    npcd_request *r = make_request(STRUCTURED_PERSONA, "I'll take the rope. Here's your silver.", 20);
    CHECK(npcd_request_set_structured(NULL, 1) == NPCD_ERR_INVALID_ARGUMENT, "set_structured(NULL) accepted");
    CHECK(npcd_request_add_action(NULL, "wave", NULL, NULL) == NPCD_ERR_INVALID_ARGUMENT,
          "add_action(NULL) accepted");
    CHECK(npcd_request_add_action(r, NULL, "x", NULL) == NPCD_ERR_INVALID_ARGUMENT, "action without a name accepted");
    CHECK(npcd_request_add_action(r, "", "x", NULL) == NPCD_ERR_INVALID_ARGUMENT, "action with an empty name accepted");
    CHECK(npcd_request_add_action(r, "wave", "\xff\xfe", NULL) == NPCD_ERR_INVALID_UTF8,
          "non-UTF-8 action description accepted");
    CHECK(npcd_request_add_action(r, "wave", NULL, "{\"a\": \"\xc3\"}") == NPCD_ERR_INVALID_UTF8,
          "non-UTF-8 action arguments accepted");
    CHECK(npcd_request_set_response_format(r, NULL) == NPCD_ERR_INVALID_ARGUMENT, "NULL response format accepted");
    CHECK(npcd_request_set_response_format(r, "\xff") == NPCD_ERR_INVALID_UTF8,
          "non-UTF-8 response format accepted");
    CHECK(npcd_request_set_structured(r, 1) == NPCD_OK, "set_structured");
    CHECK(npcd_request_set_segmentation(r, NPCD_SEGMENTATION_CLAUSE) == NPCD_OK, "set_segmentation");
    line *persona_actions = submit(c, &ls, r); /* the refused calls above added nothing */
    persona_actions->segmented = 1; /* sentences of the spoken line */
    npcd_request_free(r);

    /* The only action listed: the grammar forces it. No set_structured: a list implies it. */
    r = make_request(STRUCTURED_PERSONA, "Hello there, Fenwick!", 20);
    CHECK(npcd_request_add_action(r, "wave", "wave at the player", NULL) == NPCD_OK, "add_action");
    line *listed = submit(c, &ls, r);
    npcd_request_free(r);

    /* The persona's own action by name only, and a new one with an arguments schema. */
    r = make_request(STRUCTURED_PERSONA, "Can you do better on the lantern?", 20);
    CHECK(npcd_request_add_action(r, "haggle", NULL, "") == NPCD_OK, "add_action by name");
    CHECK(npcd_request_add_action(r, "point", "point somewhere",
                                  "{\"type\": \"object\", \"properties\": {\"where\": {\"enum\": [\"north\", \"south\"]}}}") ==
              NPCD_OK,
          "add_action with arguments");
    line *two = submit(c, &ls, r);
    npcd_request_free(r);

    r = make_request(STRUCTURED_PERSONA, "What do you sell?", 20);
    CHECK(npcd_request_set_response_format(
              r, "{\"type\": \"object\", \"properties\": {\"say\": {\"type\": \"string\", \"maxLength\": 60}, "
                 "\"mood\": {\"enum\": [\"calm\", \"angry\"]}}, \"required\": [\"say\", \"mood\"]}") == NPCD_OK,
          "set_response_format");
    line *format = submit(c, &ls, r);
    npcd_request_free(r);

    r = make_request(STRUCTURED_PERSONA, "Wave!", 20);
    CHECK(npcd_request_add_action(r, "Wave-Now", "wave", NULL) == NPCD_OK, "add_action (checked by the daemon)");
    line *bad = submit(c, &ls, r);
    npcd_request_free(r);

    pump_all_done(c, &ls, 180);
    expect_structured_line(persona_actions);
    expect_structured_line(listed);
    CHECK(strcmp(listed->action_name, "wave") == 0, "the only action listed is wave, got '%s'", listed->action_name);
    CHECK(strcmp(listed->action_args, "{}") == 0, "wave takes no arguments, got '%s'", listed->action_args);
    expect_structured_line(two);
    CHECK(strcmp(two->action_name, "haggle") == 0 || strcmp(two->action_name, "point") == 0,
          "want haggle or point, got '%s'", two->action_name);
    expect_complete_line(format);
    CHECK(format->actions == 0 && format->emotions == 0, "a response format of the game's sent ACTION/EMOTION");
    CHECK(strstr(format->json, "\"mood\"") != NULL && strstr(format->json, "\"say\"") != NULL,
          "response format: json '%s' lacks mood or say", format->json);
    CHECK(format->finished_action_name[0] == 0 && format->finished_emotion[0] == 0,
          "response format: FINISHED has an action or emotion");
    CHECK(bad->done == NPCD_EVENT_ERROR && bad->error_code == 3 && strstr(bad->finished, "actions[0].name") != NULL,
          "a bad action name: want ERROR 3 naming actions[0].name, got done=%d code=%d '%s'", bad->done,
          bad->error_code, bad->finished);
    printf("structured: '%s' %s %s %s; listed: %s; format: %s\n", persona_actions->finished,
           persona_actions->emotion, persona_actions->action_name, persona_actions->action_args,
           listed->json, format->json);
    npcd_client_free(c);
}

static pid_t start_daemon(const char *cmd) {
    pid_t pid = fork();
    CHECK(pid >= 0, "fork failed");
    if (pid == 0) {
        char shell_cmd[2048];
        snprintf(shell_cmd, sizeof shell_cmd, "exec %s", cmd);
        execl("/bin/sh", "sh", "-c", shell_cmd, (char *)NULL);
        _exit(127);
    }
    return pid;
}

static void kill_daemon(pid_t pid) {
    kill(pid, SIGKILL);
    waitpid(pid, NULL, 0);
}

static pid_t daemon_pid;

static void kill_daemon_at_exit(void) {
    if (daemon_pid > 0) kill_daemon(daemon_pid);
}

/* The daemon dies mid-line and comes back; the client reconnects by itself. */
static void test_restart(void) {
    const char *cmd = env_or_skip("NPCD_TEST_DAEMON_CMD");
    const char *addr = env_or_skip("NPCD_TEST_RESTART_ADDR");
    atexit(kill_daemon_at_exit);
    /* The client comes first: a line requested while CONNECTING waits for the connection. */
    npcd_client_options o;
    npcd_client_options_init(&o);
    o.address = addr;
    o.initial_backoff_ms = 100;
    o.max_backoff_ms = 1000;
    o.connect_queue_timeout_ms = 240000;
    npcd_client *c = npcd_client_new_with_options(&o, NULL);
    CHECK(c != NULL, "npcd_client_new_with_options(%s): %s", addr, npcd_last_error());
    CHECK(npcd_client_state(c) == NPCD_CONNECTING, "a new client is not CONNECTING (state %d)", npcd_client_state(c));
    lines ls = {0};
    line *early = say(c, &ls, personas[0], "Are you open yet?", 8);
    npcd_flush(c);
    sleep_ms(300);
    {
        npcd_event events[8];
        CHECK(npcd_poll(c, events, 8) == 0, "a line queued while CONNECTING got an event before any daemon ran");
    }
    daemon_pid = start_daemon(cmd);
    pump_until(c, &ls, early, is_done, 240, "the line queued while CONNECTING");
    expect_complete_line(early);
    CHECK(npcd_client_state(c) == NPCD_CONNECTED, "not CONNECTED after a line went through");

    line *before = say(c, &ls, personas[0], "Hello!", 8);
    pump_until(c, &ls, before, is_done, 120, "the line before the restart");
    expect_complete_line(before);

    line *cut = say(c, &ls, personas[0],
                    "Tell me the whole history of this village, every family, in great detail.", 400);
    pump_until(c, &ls, cut, has_delta, 120, "the first delta before the kill");
    CHECK(!cut->done, "the line ended before the daemon was killed");
    kill_daemon(daemon_pid);
    daemon_pid = 0;
    pump_until(c, &ls, cut, is_done, 30, "the error of the line cut by the kill");
    CHECK(cut->done == NPCD_EVENT_ERROR && cut->error_code == 14,
          "want ERROR 14 (UNAVAILABLE) for the cut line, got done=%d code=%d", cut->done,
          cut->error_code);

    double give_up = now_s() + 10;
    while (npcd_client_state(c) == NPCD_CONNECTED) {
        CHECK(now_s() < give_up, "still CONNECTED 10 s after the daemon died");
        sleep_ms(10);
    }
    CHECK(npcd_client_state(c) == NPCD_DISCONNECTED, "after losing the daemon: want DISCONNECTED, got %d",
          npcd_client_state(c));
    line *offline = say(c, &ls, personas[0], "Anyone there?", 8);
    pump_until(c, &ls, offline, is_done, 10, "the error of a request sent while offline");
    CHECK(offline->done == NPCD_EVENT_ERROR && offline->error_code == 14,
          "want ERROR 14 for a request while offline, got done=%d code=%d", offline->done,
          offline->error_code);

    daemon_pid = start_daemon(cmd);
    give_up = now_s() + 180;
    while (npcd_client_state(c) != NPCD_CONNECTED) {
        CHECK(now_s() < give_up, "did not reconnect within 180 s of the restart");
        sleep_ms(20);
    }
    line *after = say(c, &ls, personas[persona_count - 1], "Welcome back!", 8);
    pump_until(c, &ls, after, is_done, 120, "the line after the restart");
    expect_complete_line(after);
    printf("restart: cut line got '%s'; after reconnect: '%s'\n", cut->finished, after->finished);
    npcd_client_free(c);
}

/* Requests near and over gRPC's 4 MiB message limit: one over NPCD_MAX_REQUEST_BYTES is refused
 * locally (NPCD_ERR_TOO_LARGE, nothing sent); a frame of 70 requests of ~61 KB (~4.3 MB in all) goes
 * out split over several Ticks, and the session survives both. */
#define LARGE_FRAME 70
#define LARGE_TURNS 32    /* the daemon's max_history_turns */
#define LARGE_TURN_CHARS 1900 /* under its max_line_chars (2000) */
static void test_large(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    static lines ls; /* too big for the stack with LARGE_FRAME lines */
    memset(&ls, 0, sizeof ls);

    /* (a) one line of 5,000,000 characters */
    const size_t big_chars = 5000000;
    char *big = malloc(big_chars + 1);
    CHECK(big != NULL, "malloc");
    memset(big, 'a', big_chars);
    big[big_chars] = 0;
    npcd_request *r = make_request(personas[0], big, 1);
    free(big);
    char big_id[64];
    snprintf(big_id, sizeof big_id, "%s", npcd_request_id(r));
    CHECK(npcd_submit(c, r) == NPCD_ERR_TOO_LARGE, "a 5,000,000-character line was not refused as too large");
    const char *why = npcd_last_error();
    char limit[32];
    snprintf(limit, sizeof limit, "%u", (unsigned)NPCD_MAX_REQUEST_BYTES);
    CHECK(strstr(why, "500") != NULL && strstr(why, limit) != NULL && strstr(why, big_id) != NULL,
          "npcd_last_error() must name the request, its size and the limit %s: '%s'", limit, why);
    npcd_request_free(r);
    CHECK(npcd_cancel(c, big_id) == NPCD_ERR_UNKNOWN_REQUEST, "the refused request is pending");
    line *after_big = say(c, &ls, personas[0], "Still there?", 8);
    CHECK(strcmp(npcd_last_error(), "") == 0, "a successful submit leaves npcd_last_error() '%s'", npcd_last_error());
    pump_all_done(c, &ls, 120);
    expect_complete_line(after_big);
    CHECK(npcd_client_state(c) == NPCD_CONNECTED, "not connected after the refused request");

    /* (b) 70 requests of 32 turns of 1,900 characters each, in one frame, then a short line */
    char *turn = malloc(LARGE_TURN_CHARS + 1);
    CHECK(turn != NULL, "malloc");
    static const char words[] = "the harvest came in late and the river ran high all spring; ";
    for (int i = 0; i < LARGE_TURN_CHARS; i++) turn[i] = words[i % (sizeof words - 1)];
    turn[LARGE_TURN_CHARS] = 0;
    line *frame[LARGE_FRAME];
    for (int i = 0; i < LARGE_FRAME; i++) {
        char text[64];
        snprintf(text, sizeof text, "Villager %d: and what of the harvest?", i);
        r = make_request(personas[i % persona_count], text, 1);
        for (int t = 0; t < LARGE_TURNS; t++)
            CHECK(npcd_request_add_history(r, t % 2 ? "Innkeeper" : "Player", turn) == NPCD_OK, "add_history");
        frame[i] = submit(c, &ls, r);
        npcd_request_free(r);
    }
    free(turn);
    line *last = say(c, &ls, personas[0], "One more word, please.", 8);
    pump_all_done(c, &ls, 300);
    int finished = 0, refused = 0, too_long = 0;
    for (int i = 0; i < LARGE_FRAME; i++) {
        const line *l = frame[i];
        CHECK(l->done == NPCD_EVENT_FINISHED || l->error_code == 8 || l->error_code == 3,
              "%s: want FINISHED, ERROR 8 (queue full) or ERROR 3 (prompt over max_seq_len), got ERROR %d: %s",
              l->id, l->error_code, l->finished);
        if (l->done == NPCD_EVENT_FINISHED) finished++;
        else if (l->error_code == 8) refused++;
        else too_long++;
    }
    expect_complete_line(last);
    CHECK(npcd_client_state(c) == NPCD_CONNECTED, "the session did not survive the 4.3 MB frame");
    line *after = say(c, &ls, personas[0], "Goodbye for now.", 8);
    pump_all_done(c, &ls, 120);
    expect_complete_line(after);
    printf("large: 5,000,000 characters refused locally; %d lines of ~61 KB in one frame: %d finished, "
           "%d refused (queue), %d over max_seq_len; the session lives on\n",
           LARGE_FRAME, finished, refused, too_long);
    npcd_client_free(c);
}

/* A daemon with max_queue 1: of three lines in one Tick, the second and third are refused
 * with RESOURCE_EXHAUSTED and a retry hint. */
static void test_busy(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_BUSY_ADDR"), 60);
    lines ls = {0};
    line *l[3];
    for (int i = 0; i < 3; i++) l[i] = say(c, &ls, personas[0], "Quick, a word!", 8);
    pump_all_done(c, &ls, 120);
    int finished = 0, refused = 0;
    for (int i = 0; i < 3; i++) {
        if (l[i]->done == NPCD_EVENT_FINISHED) {
            expect_complete_line(l[i]);
            CHECK(l[i]->retry_after_ms == 0, "a finished line has retry_after_ms");
            finished++;
        } else {
            CHECK(l[i]->error_code == 8, "%s: want ERROR 8 (RESOURCE_EXHAUSTED), got %d: %s", l[i]->id,
                  l[i]->error_code, l[i]->finished);
            CHECK(l[i]->retry_after_ms >= 50 && l[i]->retry_after_ms <= 30000,
                  "%s: retry_after_ms %u not in 50..30000", l[i]->id, l[i]->retry_after_ms);
            refused++;
        }
    }
    CHECK(finished >= 1 && refused >= 1, "want some finished and some refused lines, got %d and %d", finished, refused);
    printf("busy: %d finished, %d refused (retry after %u ms)\n", finished, refused,
           l[2]->done == NPCD_EVENT_ERROR ? l[2]->retry_after_ms : l[1]->retry_after_ms);
    npcd_client_free(c);
}

static npcd_status options_status(const npcd_client_options *o) {
    npcd_status st = NPCD_OK;
    npcd_client *c = npcd_client_new_with_options(o, &st);
    if (c != NULL) npcd_client_free(c);
    return st;
}

/* No daemon: what is refused at once, and the connect queue against a closed port. */
static void test_offline(void) {
    /* addresses */
    const char *bad[] = {"no-port", "host:notaport", "host:0", "host:65536", ":50051", "::1:50051", "[::1]",
                         "unix:", "ipv4:127.0.0.1"};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        CHECK(npcd_client_new(bad[i], 0, 0) == NULL, "address '%s' accepted", bad[i]);
        CHECK(npcd_last_error()[0] != 0, "no npcd_last_error() for address '%s'", bad[i]);
    }
    CHECK(npcd_client_new("", 0, 0) == NULL && npcd_client_new(NULL, 0, 0) == NULL, "empty address accepted");
    const char *good[] = {"127.0.0.1:1", "localhost:50051", "[::1]:50051", "dns:///localhost:50051",
                          "ipv4:127.0.0.1:1,127.0.0.1:2", "unix:/tmp/npcd.sock"};
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        npcd_client *c = npcd_client_new(good[i], 0, 0);
        CHECK(c != NULL, "address '%s' refused: %s", good[i], npcd_last_error());
        npcd_client_free(c);
    }

    /* options */
    npcd_client_options o;
    npcd_client_options_init(&o);
    CHECK(o.struct_size == sizeof o && o.address == NULL && o.tls == 0, "npcd_client_options_init");
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "options without an address accepted");
    o.address = "no-port";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ADDRESS, "bad address: want NPCD_ERR_INVALID_ADDRESS");
    CHECK(strstr(npcd_last_error(), "no-port") != NULL, "last error '%s' does not name the address", npcd_last_error());
    o.address = "127.0.0.1:1";
    CHECK(options_status(&o) == NPCD_OK, "plain options refused: %s", npcd_last_error());
    o.struct_size = 8;
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "a short struct_size accepted");
    o.struct_size = sizeof o;
    o.token = "secret token";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "a token with a space accepted");
    o.token = "secret\r\nx-evil: 1";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "a token with CR LF accepted");
    o.token = "s3cr3t-T0ken_.~+/=";
    CHECK(options_status(&o) == NPCD_OK, "a good token refused: %s", npcd_last_error());
    o.root_certs_pem = "-----BEGIN CERTIFICATE-----";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "root_certs_pem without tls accepted");
    CHECK(strstr(npcd_last_error(), "tls") != NULL, "last error '%s' does not say tls", npcd_last_error());
    o.tls = 1;
    o.client_cert_pem = "-----BEGIN CERTIFICATE-----";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_ARGUMENT, "a client certificate without its key accepted");
    o.client_cert_pem = NULL;
    o.root_certs_pem = NULL; /* the system's roots */
    o.tls_server_name = "localhost";
    CHECK(options_status(&o) == NPCD_OK, "TLS options refused: %s", npcd_last_error());
    o.tls_server_name = "\xed\xa0\x80";
    CHECK(options_status(&o) == NPCD_ERR_INVALID_UTF8, "a surrogate in tls_server_name accepted");

    /* UTF-8: lone surrogates (CESU-8 / WTF-8), overlongs, embedded NULs */
    CHECK(npcd_request_new("p", "\xed\xa0\x80") == NULL, "a lone high surrogate accepted");
    CHECK(strstr(npcd_last_error(), "line") != NULL, "last error '%s' does not name the line", npcd_last_error());
    CHECK(npcd_request_new("\xed\xbf\xbf", "x") == NULL, "a lone low surrogate accepted as persona");
    CHECK(npcd_request_new("p", "\xed\xa0\xbd\xed\xb8\x80") == NULL, "a CESU-8 surrogate pair accepted");
    CHECK(npcd_request_new("p", "\xc0\xaf") == NULL, "an overlong '/' accepted");
    npcd_request *r = npcd_request_new("p", "caf\xc3\xa9 \xf0\x9f\x98\x80 \xed\x9f\xbf");
    CHECK(r != NULL, "good UTF-8 (U+00E9, U+1F600, U+D7FF) refused: %s", npcd_last_error());
    CHECK(npcd_request_set_speaker(r, "\xed\xa0\x80") == NPCD_ERR_INVALID_UTF8, "surrogate speaker: want INVALID_UTF8");
    CHECK(npcd_request_set_context(r, "mood", "\xed\xb0\x80") == NPCD_ERR_INVALID_UTF8, "surrogate context");
    CHECK(npcd_request_add_history(r, "Player", "\xff") == NPCD_ERR_INVALID_UTF8, "bad history text");
    CHECK(npcd_request_set_conversation(r, "\xed\xa0\x80") == NPCD_ERR_INVALID_UTF8, "surrogate conversation");
    CHECK(npcd_request_set_conversation(r, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              npcd_request_set_conversation(NULL, "c") == NPCD_ERR_INVALID_ARGUMENT, "NULL conversation");
    CHECK(npcd_request_set_conversation(r, "guard-1 talk") == NPCD_OK && npcd_request_set_conversation(r, "") == NPCD_OK,
          "set_conversation");
    CHECK(npcd_request_set_speaker(r, NULL) == NPCD_ERR_INVALID_ARGUMENT, "NULL speaker");
    CHECK(npcd_check_utf8("a\0b", 3) == NPCD_ERR_EMBEDDED_NUL, "embedded NUL: want NPCD_ERR_EMBEDDED_NUL");
    CHECK(strstr(npcd_last_error(), "byte 1") != NULL, "last error '%s' does not say where", npcd_last_error());
    CHECK(npcd_check_utf8("\xed\xa0\x80", 3) == NPCD_ERR_INVALID_UTF8, "npcd_check_utf8: surrogate");
    CHECK(npcd_check_utf8("\xc3", 1) == NPCD_ERR_INVALID_UTF8, "npcd_check_utf8: cut sequence");
    CHECK(npcd_check_utf8("caf\xc3\xa9", 5) == NPCD_OK, "npcd_check_utf8: good text");
    CHECK(npcd_check_utf8(NULL, 0) == NPCD_OK && npcd_check_utf8(NULL, 1) == NPCD_ERR_INVALID_ARGUMENT,
          "npcd_check_utf8: NULL");

    /* the connect queue: nothing listens on port 1, so the client stays CONNECTING */
    npcd_client_options_init(&o);
    o.address = "127.0.0.1:1";
    o.connect_queue_max = 2;
    o.connect_queue_timeout_ms = 400;
    npcd_client *c = npcd_client_new_with_options(&o, NULL);
    CHECK(c != NULL, "client: %s", npcd_last_error());
    lines ls = {0};
    line *q1 = say(c, &ls, personas[0], "one", 8);
    line *q2 = say(c, &ls, personas[0], "two", 8);
    line *q3 = say(c, &ls, personas[0], "three", 8);
    line *q4 = NULL;
    double t0 = now_s();
    npcd_flush(c);
    CHECK(npcd_client_state(c) == NPCD_CONNECTING, "want CONNECTING, got %d", npcd_client_state(c));
    CHECK(npcd_submit(c, NULL) == NPCD_ERR_INVALID_ARGUMENT, "submit NULL");
    {
        npcd_request *dup = make_request(personas[0], "again", 8);
        CHECK(npcd_request_set_id(dup, q1->id) == NPCD_OK, "set_id");
        CHECK(npcd_submit(c, dup) == NPCD_ERR_DUPLICATE_ID, "a queued id submitted twice");
        npcd_request_free(dup);
    }
    pump_until(c, &ls, q3, is_done, 5, "the third queued line (over connect_queue_max)");
    CHECK(q3->done == NPCD_EVENT_ERROR && q3->error_code == 8, "over connect_queue_max: want ERROR 8, got %d %d",
          q3->done, q3->error_code);
    CHECK(!q1->done && !q2->done, "queued lines ended early");
    CHECK(npcd_cancel(c, q2->id) == NPCD_OK, "cancel of a queued line");
    pump_until(c, &ls, q2, is_done, 5, "the cancelled queued line");
    CHECK(q2->done == NPCD_EVENT_FINISHED && q2->finish_reason == NPCD_FINISH_CANCELLED,
          "a cancelled queued line: want FINISHED/CANCELLED, got %d %d", q2->done, q2->finish_reason);
    q4 = say(c, &ls, personas[0], "four", 8); /* a place freed */
    pump_until(c, &ls, q1, is_done, 5, "the queue timeout");
    double waited = now_s() - t0;
    CHECK(q1->done == NPCD_EVENT_ERROR && q1->error_code == 14 && strstr(q1->finished, "connect_queue_timeout_ms"),
          "a queued line past its timeout: want ERROR 14 naming connect_queue_timeout_ms, got %d %d '%s'", q1->done,
          q1->error_code, q1->finished);
    CHECK(waited >= 0.35, "the queue timeout came after %.2f s, before 400 ms", waited);
    pump_until(c, &ls, q4, is_done, 5, "the fourth queued line's timeout");
    CHECK(q4->done == NPCD_EVENT_ERROR && q4->error_code == 14, "fourth: want ERROR 14, got %d", q4->error_code);
    CHECK(npcd_client_state(c) == NPCD_CONNECTING, "want still CONNECTING, got %d", npcd_client_state(c));
    npcd_request_free(r);
    npcd_client_free(c);
    printf("offline: addresses, options and UTF-8 checked; queued line timed out after %.2f s: '%s'\n", waited,
           q1->finished);
}

static char *read_text(const char *path) {
    FILE *f = fopen(path, "rb");
    CHECK(f != NULL, "cannot open %s", path);
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    CHECK(buf != NULL && fread(buf, 1, (size_t)n, f) == (size_t)n, "cannot read %s", path);
    buf[n] = 0;
    fclose(f);
    return buf;
}

/* One line over a client made from `o`, submitted while CONNECTING so that it is the first
 * Tick of the first stream (a refused session then fails it with the daemon's code). */
static line *secure_line(const npcd_client_options *o, lines *ls, double timeout_s, const char *what) {
    npcd_client *c = npcd_client_new_with_options(o, NULL);
    CHECK(c != NULL, "%s: npcd_client_new_with_options: %s", what, npcd_last_error());
    line *l = say(c, ls, personas[0], "Who goes there?", 8);
    npcd_flush(c);
    pump_until(c, ls, l, is_done, timeout_s, what);
    npcd_client_free(c);
    return l;
}

/* Mutual TLS and a bearer token: all three needed, each refusal visible. */
static void test_secure(void) {
    const char *addr = env_or_skip("NPCD_TEST_SECURE_ADDR");
    const char *token = env_or_skip("NPCD_TEST_TOKEN");
    char *ca = read_text(env_or_skip("NPCD_TEST_CA_PEM"));
    char *cert = read_text(env_or_skip("NPCD_TEST_CLIENT_CERT"));
    char *key = read_text(env_or_skip("NPCD_TEST_CLIENT_KEY"));
    lines ls = {0};
    npcd_client_options o;
    npcd_client_options_init(&o);
    o.address = addr;
    o.initial_backoff_ms = 100;
    o.max_backoff_ms = 1000;
    o.connect_queue_timeout_ms = 60000;
    o.tls = 1;
    o.root_certs_pem = ca;
    o.client_cert_pem = cert;
    o.client_key_pem = key;
    o.tls_server_name = "localhost";
    o.token = token;

    line *ok = secure_line(&o, &ls, 120, "a line with TLS, a client certificate and the token");
    expect_complete_line(ok);

    o.token = NULL;
    line *none = secure_line(&o, &ls, 60, "a line without the token");
    CHECK(none->done == NPCD_EVENT_ERROR && none->error_code == 16 && strstr(none->finished, "missing"),
          "no token: want ERROR 16 (UNAUTHENTICATED) saying missing, got %d %d '%s'", none->done,
          none->error_code, none->finished);

    o.token = "not-the-token";
    line *wrong = secure_line(&o, &ls, 60, "a line with a wrong token");
    CHECK(wrong->done == NPCD_EVENT_ERROR && wrong->error_code == 16 && strstr(wrong->finished, "wrong"),
          "wrong token: want ERROR 16 saying wrong, got %d %d '%s'", wrong->done, wrong->error_code,
          wrong->finished);

    /* no client certificate, and plaintext: the handshake fails, the client never connects */
    o.token = token;
    o.client_cert_pem = NULL;
    o.client_key_pem = NULL;
    o.connect_queue_timeout_ms = 1500;
    line *nocert = secure_line(&o, &ls, 30, "a line without a client certificate");
    CHECK(nocert->done == NPCD_EVENT_ERROR && nocert->error_code == 14 &&
              strstr(nocert->finished, "connect_queue_timeout_ms"),
          "no client certificate: want ERROR 14 after the connect timeout, got %d %d '%s'", nocert->done,
          nocert->error_code, nocert->finished);
    npcd_client_options_init(&o);
    o.address = addr;
    o.token = token;
    o.connect_queue_timeout_ms = 1500;
    line *plain = secure_line(&o, &ls, 30, "a plaintext line to the TLS port");
    CHECK(plain->done == NPCD_EVENT_ERROR && plain->error_code == 14,
          "plaintext to TLS: want ERROR 14, got %d %d '%s'", plain->done, plain->error_code, plain->finished);
    printf("secure: mutual TLS + token '%s'; no token: '%s'; no client certificate: '%s'\n", ok->finished,
           none->finished, nocert->finished);
    free(ca);
    free(cert);
    free(key);
}

/* The daemon's personas through the C ABI: every test persona, ready, with its metadata as JSON; a closed
 * port answers NPCD_ERR_RPC with UNAVAILABLE within the timeout; bad arguments are refused by name. */
static void test_personas(void) {
    const char *addr = env_or_skip("NPCD_TEST_ADDR");
    npcd_client *c = connect_to(addr, 60);
    npcd_persona_list *list = NULL;
    int32_t code = -1;
    CHECK(npcd_list_personas(c, 10000, &list, &code) == NPCD_OK && list != NULL && code == 0,
          "npcd_list_personas: %s", npcd_last_error());
    CHECK(npcd_persona_list_count(list) == persona_count, "%d personas listed, want %d",
          npcd_persona_list_count(list), persona_count);
    for (int i = 0; i < persona_count; i++) {
        const npcd_persona *found = NULL;
        for (int j = 0; j < npcd_persona_list_count(list); j++)
            if (strcmp(npcd_persona_list_get(list, j)->id, personas[i]) == 0) found = npcd_persona_list_get(list, j);
        CHECK(found != NULL, "persona %s not listed", personas[i]);
        CHECK(found->status == NPCD_PERSONA_READY && found->error[0] == 0, "%s: status %d, error '%s'", found->id,
              found->status, found->error);
        CHECK(found->display_name[0] != 0 && found->description[0] != 0, "%s: no display name or description",
              found->id);
        CHECK(found->metadata_json[0] == '{', "%s: metadata '%s' is not a JSON object", found->id,
              found->metadata_json);
        CHECK(found->has_adapter == (strcmp(found->id, "plain") != 0), "%s: has_adapter %d", found->id,
              found->has_adapter);
        if (strcmp(found->id, STRUCTURED_PERSONA) == 0)
            CHECK(strstr(found->metadata_json, "\"voice_id\":\"merchant_01\"") != NULL, "merchant metadata '%s'",
                  found->metadata_json);
    }
    CHECK(npcd_persona_list_get(list, -1) == NULL && npcd_persona_list_get(list, persona_count) == NULL,
          "an index out of range gave a persona");
    npcd_persona_list_free(list);
    npcd_persona_list_free(NULL);
    CHECK(npcd_list_personas(NULL, 0, &list, &code) == NPCD_ERR_INVALID_ARGUMENT, "a NULL client accepted");
    CHECK(npcd_list_personas(c, 0, NULL, NULL) == NPCD_ERR_INVALID_ARGUMENT, "a NULL list_out accepted");
    CHECK(strstr(npcd_last_error(), "list_out") != NULL, "last error '%s' does not name list_out", npcd_last_error());
    npcd_client_free(c);

    npcd_client *closed = npcd_client_new("127.0.0.1:1", 50, 200);
    CHECK(closed != NULL, "npcd_client_new: %s", npcd_last_error());
    const double start = now_s();
    list = (npcd_persona_list *)1;
    CHECK(npcd_list_personas(closed, 3000, &list, &code) == NPCD_ERR_RPC && list == NULL, "a closed port listed");
    CHECK(code == 14 || code == 4, "a closed port gave gRPC code %d (%s)", code, npcd_last_error());
    CHECK(now_s() - start < 10, "the closed port took %.1f s", now_s() - start);
    CHECK(strstr(npcd_last_error(), "ListPersonas") != NULL, "last error '%s'", npcd_last_error());
    npcd_client_free(closed);
    printf("personas: %d listed\n", persona_count);
}

/* One line of `conversation`, waited for: it must finish. */
static line *conversation_line(npcd_client *c, lines *ls, const char *persona, const char *conversation,
                               const char *text) {
    npcd_request *r = make_request(persona, text, 8);
    CHECK(npcd_request_set_conversation(r, conversation) == NPCD_OK, "set_conversation");
    line *l = submit(c, ls, r);
    npcd_request_free(r);
    pump_until(c, ls, l, is_done, 120, l->id);
    expect_complete_line(l);
    return l;
}

/* A save game's conversations through the C ABI: a line in a conversation is remembered (the next line's
 * prompt holds its turns); the blob exported then, imported after a reset, brings that memory back, turn by turn
 * as npcd_get_conversation reads it; a turn of the game's own joins it; a corrupt blob is refused with
 * INVALID_ARGUMENT and loses nothing; bad arguments are refused by name. */
static void test_conversations(void) {
    npcd_client *c = connect_to(env_or_skip("NPCD_TEST_ADDR"), 60);
    lines ls = {0};
    const char *persona = personas[0];
    char conversation[64];
    snprintf(conversation, sizeof conversation, "save-test-%d", (int)getpid());
    int32_t code = -1;
    CHECK(npcd_reset_conversation(c, conversation, persona, 10000, &code) == NPCD_OK && code == 0,
          "npcd_reset_conversation: %s", npcd_last_error());
    CHECK(conversation_line(c, &ls, persona, conversation, "Good morning.")->history_turns == 0,
          "a new conversation's first line held history");
    npcd_blob *saved = NULL;
    CHECK(npcd_export_conversations(c, persona, 10000, &saved, &code) == NPCD_OK && saved != NULL,
          "npcd_export_conversations: %s", npcd_last_error());
    CHECK(npcd_blob_size(saved) > 0 && npcd_blob_data(saved) != NULL && npcd_blob_conversations(saved) >= 1,
          "the blob: %llu bytes, %u conversations", (unsigned long long)npcd_blob_size(saved),
          npcd_blob_conversations(saved));
    const line *second = conversation_line(c, &ls, persona, conversation, "Any news?");
    CHECK(second->history_turns >= 2, "the second line held %u earlier turns", second->history_turns);

    CHECK(npcd_reset_conversation(c, conversation, persona, 10000, &code) == NPCD_OK, "reset: %s", npcd_last_error());
    CHECK(conversation_line(c, &ls, persona, conversation, "Hello?")->history_turns == 0,
          "a reset conversation still held history");
    uint32_t imported = 0;
    CHECK(npcd_import_conversations(c, npcd_blob_data(saved), npcd_blob_size(saved), 1, 10000, &imported, &code) ==
              NPCD_OK && imported == npcd_blob_conversations(saved),
          "npcd_import_conversations: %u imported, code %d: %s", imported, code, npcd_last_error());
    const line *restored = conversation_line(c, &ls, persona, conversation, "Where were we?");
    CHECK(restored->history_turns == 2, "after the import the line held %u earlier turns, want the save's 2",
          restored->history_turns);

    /* what the NPC remembers now: the save's exchange and the line after it; then a turn of the game's own */
    npcd_conversation *kept = NULL;
    CHECK(npcd_get_conversation(c, conversation, persona, 10000, &kept, &code) == NPCD_OK && kept != NULL,
          "npcd_get_conversation: %s", npcd_last_error());
    CHECK(npcd_conversation_turn_count(kept) == 4, "%d turns kept, want 4", npcd_conversation_turn_count(kept));
    CHECK(strcmp(npcd_conversation_turn(kept, 0)->speaker, "Player") == 0 && !npcd_conversation_turn(kept, 0)->npc &&
              strcmp(npcd_conversation_turn(kept, 0)->text, "Good morning.") == 0 && npcd_conversation_turn(kept, 1)->npc &&
              strcmp(npcd_conversation_turn(kept, 2)->text, "Where were we?") == 0,
          "the kept turns: '%s' (npc %d), then npc %d, then '%s'", npcd_conversation_turn(kept, 0)->text,
          npcd_conversation_turn(kept, 0)->npc, npcd_conversation_turn(kept, 1)->npc, npcd_conversation_turn(kept, 2)->text);
    CHECK(npcd_conversation_turn(kept, -1) == NULL && npcd_conversation_turn(kept, 4) == NULL, "a turn out of range");
    CHECK(npcd_conversation_summary(kept)[0] == 0, "a summary '%s'", npcd_conversation_summary(kept));
    npcd_conversation_free(kept);
    CHECK(npcd_add_turn(c, conversation, persona, "Narrator", "The bell rang twice.", 0, 10000, &code) == NPCD_OK,
          "npcd_add_turn: %s", npcd_last_error());
    CHECK(npcd_get_conversation(c, conversation, persona, 10000, &kept, &code) == NPCD_OK &&
              npcd_conversation_turn_count(kept) == 5 &&
              strcmp(npcd_conversation_turn(kept, 4)->text, "The bell rang twice.") == 0 &&
              strcmp(npcd_conversation_turn(kept, 4)->speaker, "Narrator") == 0,
          "the added turn: %d turns (%s)", npcd_conversation_turn_count(kept), npcd_last_error());
    npcd_conversation_free(kept);
    CHECK(npcd_add_turn(c, conversation, "no-such-persona", "Narrator", "x", 0, 10000, &code) == NPCD_ERR_RPC &&
              code == 5, "a turn for an unknown persona: code %d (%s)", code, npcd_last_error());
    CHECK(npcd_add_turn(c, conversation, persona, NULL, "x", 0, 0, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              strstr(npcd_last_error(), "speaker") != NULL, "a NULL speaker: '%s'", npcd_last_error());
    CHECK(npcd_get_conversation(c, conversation, persona, 0, NULL, NULL) == NPCD_ERR_INVALID_ARGUMENT,
          "a NULL conversation_out accepted");
    npcd_conversation_free(NULL);

    static const uint8_t corrupt[] = "not an npcd blob";
    CHECK(npcd_import_conversations(c, corrupt, sizeof corrupt - 1, 1, 10000, &imported, &code) == NPCD_ERR_RPC &&
              code == 3 && imported == 0,
          "a corrupt blob: code %d, %u imported (%s)", code, imported, npcd_last_error());
    CHECK(strstr(npcd_last_error(), "ImportConversations") != NULL, "last error '%s'", npcd_last_error());
    const line *after = conversation_line(c, &ls, persona, conversation, "Still there?");
    CHECK(after->history_turns >= 5, "the refused blob lost the conversation: %u earlier turns", after->history_turns);

    npcd_blob *none = (npcd_blob *)1;
    CHECK(npcd_export_conversations(NULL, NULL, 0, &none, NULL) == NPCD_ERR_INVALID_ARGUMENT, "a NULL client accepted");
    CHECK(npcd_export_conversations(c, NULL, 0, NULL, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              strstr(npcd_last_error(), "blob_out") != NULL, "a NULL blob_out: '%s'", npcd_last_error());
    CHECK(npcd_export_conversations(c, "\xed\xa0\x80", 0, &none, NULL) == NPCD_ERR_INVALID_UTF8 && none == NULL &&
              strstr(npcd_last_error(), "persona") != NULL, "a surrogate persona: '%s'", npcd_last_error());
    CHECK(npcd_import_conversations(c, NULL, 5, 1, 0, NULL, NULL) == NPCD_ERR_INVALID_ARGUMENT, "NULL data accepted");
    CHECK(npcd_import_conversations(c, corrupt, (uint64_t)NPCD_MAX_REQUEST_BYTES + 1, 1, 0, NULL, NULL) ==
              NPCD_ERR_TOO_LARGE, "an oversized blob was sent");
    CHECK(npcd_reset_conversation(c, NULL, persona, 0, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              strstr(npcd_last_error(), "conversation") != NULL, "a NULL conversation: '%s'", npcd_last_error());
    CHECK(npcd_blob_size(NULL) == 0 && npcd_blob_data(NULL) == NULL, "a NULL blob has bytes");

    /* the game's own edit: what the NPC remembers is replaced, the conversation kept */
    const npcd_turn edited[] = {{"Player", "I found your ring.", 0}, {"NPC", "My ring! Thank you.", 1}};
    CHECK(npcd_set_conversation(c, conversation, persona, edited, 2, "They met at the market.", 10000, &code) ==
              NPCD_OK, "npcd_set_conversation: %s", npcd_last_error());
    CHECK(npcd_get_conversation(c, conversation, persona, 10000, &kept, &code) == NPCD_OK &&
              npcd_conversation_turn_count(kept) == 2 &&
              strcmp(npcd_conversation_turn(kept, 0)->text, "I found your ring.") == 0 &&
              npcd_conversation_turn(kept, 1)->npc &&
              strcmp(npcd_conversation_summary(kept), "They met at the market.") == 0,
          "the edited conversation: %d turns, summary '%s' (%s)", npcd_conversation_turn_count(kept),
          kept ? npcd_conversation_summary(kept) : "", npcd_last_error());
    npcd_conversation_free(kept);
    CHECK(conversation_line(c, &ls, persona, conversation, "Do you remember me?")->history_turns == 2,
          "the next line did not hold the edited turns");
    const npcd_turn bad_turn[] = {{"Player", "ok", 0}, {NULL, "x", 0}};
    CHECK(npcd_set_conversation(c, conversation, persona, bad_turn, 2, NULL, 0, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              strstr(npcd_last_error(), "turns[1].speaker") != NULL, "a NULL speaker in turns[1]: '%s'",
          npcd_last_error());
    CHECK(npcd_set_conversation(c, conversation, persona, NULL, 1, NULL, 0, NULL) == NPCD_ERR_INVALID_ARGUMENT &&
              strstr(npcd_last_error(), "turns is NULL") != NULL, "NULL turns with count 1: '%s'", npcd_last_error());
    CHECK(npcd_set_conversation(c, conversation, "no-such-persona", edited, 2, NULL, 10000, &code) == NPCD_ERR_RPC &&
              code == 5, "an edit for an unknown persona: code %d (%s)", code, npcd_last_error());
    printf("conversations: %llu-byte blob, restored %u earlier turns\n", (unsigned long long)npcd_blob_size(saved),
           restored->history_turns);
    npcd_blob_free(saved);
    npcd_blob_free(NULL);
    npcd_client_free(c);
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s stream|tick|cancel|structured|restart|busy|offline|secure|large|personas|conversations\n",
                argv[0]);
        return 2;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    load_personas();
    if (strcmp(argv[1], "stream") == 0) test_stream();
    else if (strcmp(argv[1], "tick") == 0) test_tick();
    else if (strcmp(argv[1], "cancel") == 0) test_cancel();
    else if (strcmp(argv[1], "structured") == 0) test_structured();
    else if (strcmp(argv[1], "restart") == 0) test_restart();
    else if (strcmp(argv[1], "busy") == 0) test_busy();
    else if (strcmp(argv[1], "offline") == 0) test_offline();
    else if (strcmp(argv[1], "secure") == 0) test_secure();
    else if (strcmp(argv[1], "large") == 0) test_large();
    else if (strcmp(argv[1], "personas") == 0) test_personas();
    else if (strcmp(argv[1], "conversations") == 0) test_conversations();
    else {
        fprintf(stderr, "unknown flow %s\n", argv[1]);
        return 2;
    }
    return 0;
}
