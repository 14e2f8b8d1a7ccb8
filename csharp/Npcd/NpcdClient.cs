using System;
using System.Collections.Generic;
using System.Runtime.InteropServices;

namespace Npcd
{
    /// <summary>How to connect (npcd_client_options). Only Address is required.</summary>
    public sealed class NpcdClientOptions
    {
        /// <summary>"host:port" of the daemon, e.g. "127.0.0.1:50051" (or "[::1]:50051", or a gRPC URI).</summary>
        public string Address;
        /// <summary>First wait between connection attempts; 0 = 250 ms.</summary>
        public uint InitialBackoffMs;
        /// <summary>The most the wait grows to (doubling); 0 = 5000 ms.</summary>
        public uint MaxBackoffMs;
        /// <summary>null or "": none. Else sent as "authorization: Bearer &lt;token&gt;" on every call;
        /// printable ASCII without spaces.</summary>
        public string Token;
        /// <summary>TLS instead of plaintext.</summary>
        public bool Tls;
        /// <summary>TLS: PEM root certificates the server's certificate is checked against; null = the system's.</summary>
        public string RootCertsPem;
        /// <summary>Mutual TLS: the client's certificate chain and private key (PEM), both or neither.</summary>
        public string ClientCertPem;
        public string ClientKeyPem;
        /// <summary>TLS: the name the server's certificate carries, when it differs from the address's host.</summary>
        public string TlsServerName;
        /// <summary>Lines requested while Connecting wait for the first connection: at most this many
        /// (0 = 64; more fail with code 8), each at most ConnectQueueTimeoutMs (0 = 10000; then code 14).</summary>
        public uint ConnectQueueMax;
        public uint ConnectQueueTimeoutMs;

        public NpcdClientOptions(string address)
        {
            Address = address;
        }
    }

    /// <summary>A connection to the npcd daemon. Not thread-safe: use it from one thread (the
    /// game thread) and call Poll once per frame. Lines requested between two polls go out
    /// together as one Tick. It reconnects by itself when the daemon restarts; lines in flight
    /// at the disconnect fail with code 14 (UNAVAILABLE), and so do lines requested while it
    /// is Disconnected. Lines requested while it is still Connecting (never connected yet) wait
    /// for the connection (NpcdClientOptions.ConnectQueueMax / ConnectQueueTimeoutMs).</summary>
    public sealed class NpcdClient : IDisposable
    {
        private const int BatchSize = 64;

        private IntPtr handle;
        private readonly Dictionary<string, NpcdLine> lines = new Dictionary<string, NpcdLine>();
        private readonly NativeMethods.NativeEvent[] buffer = new NativeMethods.NativeEvent[BatchSize];

        /// <param name="address">"host:port" of the daemon, e.g. "127.0.0.1:50051".</param>
        /// <param name="initialBackoffMs">first wait between connection attempts; 0 = 250 ms</param>
        /// <param name="maxBackoffMs">the most the wait grows to (doubling); 0 = 5000 ms</param>
        /// <exception cref="ArgumentException">the address is empty or does not parse</exception>
        public NpcdClient(string address, uint initialBackoffMs = 0, uint maxBackoffMs = 0)
            : this(new NpcdClientOptions(address) { InitialBackoffMs = initialBackoffMs, MaxBackoffMs = maxBackoffMs })
        {
        }

        /// <exception cref="ArgumentException">an option is refused; the message names it</exception>
        public NpcdClient(NpcdClientOptions options)
        {
            if (options == null) throw new ArgumentNullException("options");
            if (string.IsNullOrEmpty(options.Address)) throw new ArgumentException("address is empty", "address");
            var native = new NativeMethods.NativeOptions();
            native.StructSize = (uint)Marshal.SizeOf(typeof(NativeMethods.NativeOptions));
            native.InitialBackoffMs = options.InitialBackoffMs;
            native.MaxBackoffMs = options.MaxBackoffMs;
            native.ConnectQueueMax = options.ConnectQueueMax;
            native.ConnectQueueTimeoutMs = options.ConnectQueueTimeoutMs;
            native.Tls = options.Tls ? 1 : 0;
            try
            {
                native.Address = NativeMethods.Utf8Alloc(options.Address, "address");
                native.Token = NativeMethods.Utf8Alloc(options.Token, "Token");
                native.RootCertsPem = NativeMethods.Utf8Alloc(options.RootCertsPem, "RootCertsPem");
                native.ClientCertPem = NativeMethods.Utf8Alloc(options.ClientCertPem, "ClientCertPem");
                native.ClientKeyPem = NativeMethods.Utf8Alloc(options.ClientKeyPem, "ClientKeyPem");
                native.TlsServerName = NativeMethods.Utf8Alloc(options.TlsServerName, "TlsServerName");
                int status;
                handle = NativeMethods.npcd_client_new_with_options(ref native, out status);
                if (handle == IntPtr.Zero)
                    throw new ArgumentException(NativeMethods.LastError() + " (status " + status + ")",
                                                status == 6 ? "address" : "options");
            }
            finally
            {
                Free(native.Address);
                Free(native.Token);
                Free(native.RootCertsPem);
                Free(native.ClientCertPem);
                Free(native.ClientKeyPem);
                Free(native.TlsServerName);
            }
        }

        private static void Free(IntPtr p)
        {
            if (p != IntPtr.Zero) Marshal.FreeHGlobal(p);
        }

        public ConnectionState State
        {
            get { return (ConnectionState)NativeMethods.npcd_client_state(Live()); }
        }

        /// <summary>Lines requested and not ended yet.</summary>
        public int ActiveLines { get { return lines.Count; } }

        /// <summary>Requests a line; it goes out at the next Poll or Flush. Everything is checked
        /// before anything is queued: an ArgumentException (ParamName the field) means nothing
        /// was sent. A request id is in use until its line ended, i.e. its Finished or Failed
        /// was raised; after Cancel() that happens at the next Poll.</summary>
        /// <exception cref="RequestTooLargeException">the request is over
        /// RequestTooLargeException.MaxRequestBytes serialized (gRPC's 4 MiB message limit);
        /// nothing was sent and the client goes on</exception>
        public NpcdLine Say(LineRequest request)
        {
            if (request == null) throw new ArgumentNullException("request");
            Live();
            IntPtr native = RequestBuilder.Build(request);
            try
            {
                string id = NativeMethods.FromUtf8(NativeMethods.npcd_request_id(native));
                if (lines.ContainsKey(id))
                    throw new ArgumentException("request id " + id + " is still in use: its line has not ended"
                                                + " (a cancelled line ends at the next Poll)", "RequestId");
                int status = NativeMethods.npcd_submit(handle, native);
                if (status == NativeMethods.StatusDuplicateId) throw new ArgumentException("request id " + id + " is already in use", "RequestId");
                if (status == NativeMethods.StatusTooLarge) throw new RequestTooLargeException(NativeMethods.LastError());
                if (status != 0) throw new ArgumentException("the request was refused (status " + status + ")", "request");
                var line = new NpcdLine(this, id, request.Persona);
                lines.Add(id, line);
                return line;
            }
            finally
            {
                NativeMethods.npcd_request_free(native);
            }
        }

        /// <summary>Ends a line early. False when no line with this id is active.</summary>
        public bool Cancel(string requestId)
        {
            if (requestId == null) throw new ArgumentNullException("requestId");
            return NativeMethods.npcd_cancel(Live(), NativeMethods.Utf8(requestId, "requestId")) == 0;
        }

        /// <summary>What every NPC remembers (the lines' Conversation), for the game's save file: store the
        /// bytes as they are and give them to ImportConversations when the save is loaded. Only `persona`'s
        /// conversations unless it is null. Blocks for at most timeoutMs (0: 5000).</summary>
        /// <exception cref="NpcdUnavailableException">the daemon did not answer in time or refused</exception>
        public byte[] ExportConversations(string persona = null, uint timeoutMs = 0)
        {
            IntPtr blob;
            int code;
            Called(NativeMethods.npcd_export_conversations(Live(), NativeMethods.Utf8OrNull(persona, "persona"), timeoutMs,
                                                           out blob, out code), code, "npcd_export_conversations");
            try
            {
                var data = new byte[checked((int)NativeMethods.npcd_blob_size(blob))];
                if (data.Length > 0) Marshal.Copy(NativeMethods.npcd_blob_data(blob), data, 0, data.Length);
                return data;
            }
            finally
            {
                NativeMethods.npcd_blob_free(blob);
            }
        }

        /// <summary>Restores an exported blob; returns how many conversations it held. replace (loading a save
        /// game): this client's conversations become exactly the blob's; false adds them. A corrupt or foreign
        /// blob throws NpcdUnavailableException with Code 3 (INVALID_ARGUMENT), and nothing stored is lost; one over
        /// RequestTooLargeException.MaxRequestBytes throws RequestTooLargeException and is not sent.</summary>
        public int ImportConversations(byte[] blob, bool replace = true, uint timeoutMs = 0)
        {
            if (blob == null) throw new ArgumentNullException("blob");
            uint imported;
            int code;
            Called(NativeMethods.npcd_import_conversations(Live(), blob, (ulong)blob.LongLength, replace ? 1 : 0, timeoutMs,
                                                           out imported, out code), code, "npcd_import_conversations");
            return (int)imported;
        }

        /// <summary>Forgets one conversation: the NPC starts afresh. Its id and persona, as the lines gave them.</summary>
        public void ResetConversation(string conversation, string persona, uint timeoutMs = 0)
        {
            int code;
            Called(NativeMethods.npcd_reset_conversation(Live(), NativeMethods.Utf8(conversation, "conversation"),
                                                         NativeMethods.Utf8(persona, "persona"), timeoutMs, out code),
                   code, "npcd_reset_conversation");
        }

        /// <summary>What one NPC remembers, for a journal or a quest log: every turn, oldest first, and the
        /// summary of dropped turns for a persona that summarises. An unknown conversation is an empty one.</summary>
        public ConversationTurns GetConversation(string conversation, string persona, uint timeoutMs = 0)
        {
            IntPtr native;
            int code;
            Called(NativeMethods.npcd_get_conversation(Live(), NativeMethods.Utf8(conversation, "conversation"),
                                                       NativeMethods.Utf8(persona, "persona"), timeoutMs, out native, out code),
                   code, "npcd_get_conversation");
            try
            {
                var turns = new Turn[NativeMethods.npcd_conversation_turn_count(native)];
                for (int i = 0; i < turns.Length; i++)
                {
                    var t = (NativeMethods.NativeTurn)Marshal.PtrToStructure(NativeMethods.npcd_conversation_turn(native, i),
                                                                             typeof(NativeMethods.NativeTurn));
                    turns[i] = new Turn(NativeMethods.FromUtf8(t.Speaker), NativeMethods.FromUtf8(t.Text), t.Npc != 0);
                }
                return new ConversationTurns(turns, NativeMethods.FromUtf8(NativeMethods.npcd_conversation_summary(native)));
            }
            finally
            {
                NativeMethods.npcd_conversation_free(native);
            }
        }

        /// <summary>Replaces what one NPC remembers with the game's own edit: these turns, oldest first, and a
        /// summary of what came before them (null or "": none). For a quest that rewrites a memory, a trimmed
        /// history, or a conversation moved to another NPC; unlike ResetConversation the conversation is kept.
        /// </summary>
        /// <exception cref="ArgumentException">a turn's Speaker or Text is null or cannot be sent (ParamName
        /// names it: "turns[1].Speaker")</exception>
        /// <exception cref="NpcdUnavailableException">the daemon refused (Code 3: more turns or text than its
        /// limits, named in the message; nothing stored changed) or did not answer</exception>
        public void SetConversation(string conversation, string persona, Turn[] turns, string summary = null,
                                    uint timeoutMs = 0)
        {
            if (turns == null) throw new ArgumentNullException("turns");
            byte[] conversationUtf8 = NativeMethods.Utf8(conversation, "conversation");
            byte[] personaUtf8 = NativeMethods.Utf8(persona, "persona");
            byte[] summaryUtf8 = NativeMethods.Utf8OrNull(summary, "summary");
            var native = new NativeMethods.NativeTurn[turns.Length];
            try
            {
                for (int i = 0; i < turns.Length; i++)
                {
                    string field = "turns[" + i + "]";
                    if (turns[i].Speaker == null) throw new ArgumentNullException(field + ".Speaker");
                    if (turns[i].Text == null) throw new ArgumentNullException(field + ".Text");
                    native[i].Speaker = NativeMethods.Utf8Alloc(turns[i].Speaker, field + ".Speaker");
                    native[i].Text = NativeMethods.Utf8Alloc(turns[i].Text, field + ".Text");
                    native[i].Npc = turns[i].Npc ? 1 : 0;
                }
                int code;
                Called(NativeMethods.npcd_set_conversation(Live(), conversationUtf8, personaUtf8, native, native.Length,
                                                           summaryUtf8, timeoutMs, out code),
                       code, "npcd_set_conversation");
            }
            finally
            {
                foreach (var t in native)
                {
                    if (t.Speaker != IntPtr.Zero) Marshal.FreeHGlobal(t.Speaker);
                    if (t.Text != IntPtr.Zero) Marshal.FreeHGlobal(t.Text);
                }
            }
        }

        /// <summary>Adds a turn the NPC should remember without a line of its own: what the player told another
        /// NPC nearby, an event of the game, or (npc: true) words the game puts in the NPC's mouth.</summary>
        public void AddTurn(string conversation, string persona, string speaker, string text, bool npc = false,
                            uint timeoutMs = 0)
        {
            int code;
            Called(NativeMethods.npcd_add_turn(Live(), NativeMethods.Utf8(conversation, "conversation"),
                                               NativeMethods.Utf8(persona, "persona"), NativeMethods.Utf8(speaker, "speaker"),
                                               NativeMethods.Utf8(text, "text"), npc ? 1 : 0, timeoutMs, out code),
                   code, "npcd_add_turn");
        }

        // A blocking call's status: NpcdUnavailableException for the daemon's (gRPC) failure, RequestTooLargeException
        // for a blob over the limit (ParamName "blob"), else the binding's own bug.
        private static void Called(int status, int rpcCode, string call)
        {
            if (status == NativeMethods.StatusRpc) throw new NpcdUnavailableException(rpcCode, NativeMethods.LastError());
            if (status == NativeMethods.StatusTooLarge) throw new RequestTooLargeException(NativeMethods.LastError(), "blob");
            if (status != NativeMethods.StatusOk) throw new InvalidOperationException(call + ": " + NativeMethods.LastError());
        }

        /// <summary>The daemon's personas, by id: for an editor's dropdown or a loading screen. Blocks
        /// for at most timeoutMs (0: 5000), so not a call for every frame; lines in flight go on.</summary>
        /// <exception cref="NpcdUnavailableException">the daemon did not answer in time or refused</exception>
        public PersonaInfo[] ListPersonas(uint timeoutMs = 0)
        {
            IntPtr list;
            int code;
            Called(NativeMethods.npcd_list_personas(Live(), timeoutMs, out list, out code), code, "npcd_list_personas");
            try
            {
                var personas = new PersonaInfo[NativeMethods.npcd_persona_list_count(list)];
                for (int i = 0; i < personas.Length; i++)
                {
                    var p = (NativeMethods.NativePersona)Marshal.PtrToStructure(
                        NativeMethods.npcd_persona_list_get(list, i), typeof(NativeMethods.NativePersona));
                    personas[i] = new PersonaInfo(NativeMethods.FromUtf8(p.Id), NativeMethods.FromUtf8(p.DisplayName),
                        NativeMethods.FromUtf8(p.Description), NativeMethods.FromUtf8(p.MetadataJson),
                        (PersonaStatus)p.Status, NativeMethods.FromUtf8(p.Error), p.HasAdapter != 0);
                }
                return personas;
            }
            finally
            {
                NativeMethods.npcd_persona_list_free(list);
            }
        }

        /// <summary>Sends the lines requested and cancels issued since the last Poll now.</summary>
        public void Flush()
        {
            NativeMethods.npcd_flush(Live());
        }

        /// <summary>Flushes, then raises the events that arrived since the last call, in
        /// order. Returns how many. If a handler throws, the remaining events are still
        /// delivered and the exceptions are rethrown together at the end. A handler may
        /// Dispose the client: each batch is copied out of native memory before any handler
        /// runs, and the events after the Dispose are dropped (Dispose already ended their
        /// lines).</summary>
        public int Poll()
        {
            Live();
            int total = 0;
            List<Exception> errors = null;
            int n;
            do
            {
                n = NativeMethods.npcd_poll(handle, buffer, BatchSize);
                // copy first: the strings live in the client, which a handler may free
                var batch = new PolledEvent[n];
                for (int i = 0; i < n; i++) batch[i] = PolledEvent.From(ref buffer[i]);
                for (int i = 0; i < n && handle != IntPtr.Zero; i++)
                {
                    try
                    {
                        Dispatch(batch[i]);
                    }
                    catch (Exception e)
                    {
                        if (errors == null) errors = new List<Exception>();
                        errors.Add(e);
                    }
                }
                total += n;
            } while (n == BatchSize && handle != IntPtr.Zero);
            if (errors != null) throw new AggregateException("an npcd event handler threw", errors);
            return total;
        }

        /// <summary>Closes the connection. Active lines fail with code 1 (CANCELLED). May be
        /// called from an event handler inside Poll.</summary>
        public void Dispose()
        {
            if (handle == IntPtr.Zero) return;
            NativeMethods.npcd_client_free(handle);
            handle = IntPtr.Zero;
            var active = new List<NpcdLine>(lines.Values);
            lines.Clear();
            foreach (var line in active)
            {
                line.OnEnded(new LineResult(line.Id, FinishReason.Unspecified, line.Text,
                    new NpcdError(1, "CANCELLED", "the client was disposed"), 0, 0, 0, 0, 0));
            }
        }

        private IntPtr Live()
        {
            if (handle == IntPtr.Zero) throw new ObjectDisposedException("NpcdClient");
            return handle;
        }

        /// <summary>One npcd_event, in managed memory.</summary>
        private sealed class PolledEvent
        {
            public string RequestId, Text, ErrorStatus, Json, ActionName, ActionArgsJson, Emotion;
            public int Kind, FinishReason, ErrorCode;
            public uint PromptTokens, CompletionTokens, RetryAfterMs, SentenceIndex, CachedPromptTokens, HistoryTurns;
            public float QueuedMs, FirstTokenMs, TotalMs;

            public static PolledEvent From(ref NativeMethods.NativeEvent e)
            {
                return new PolledEvent
                {
                    RequestId = NativeMethods.FromUtf8(e.RequestId),
                    Text = NativeMethods.FromUtf8(e.Text),
                    ErrorStatus = NativeMethods.FromUtf8(e.ErrorStatus),
                    Json = NativeMethods.FromUtf8(e.Json),
                    ActionName = NativeMethods.FromUtf8(e.ActionName),
                    ActionArgsJson = NativeMethods.FromUtf8(e.ActionArgsJson),
                    Emotion = NativeMethods.FromUtf8(e.Emotion),
                    Kind = e.Kind,
                    FinishReason = e.FinishReason,
                    ErrorCode = e.ErrorCode,
                    PromptTokens = e.PromptTokens,
                    CompletionTokens = e.CompletionTokens,
                    RetryAfterMs = e.RetryAfterMs,
                    SentenceIndex = e.SentenceIndex,
                    CachedPromptTokens = e.CachedPromptTokens,
                    HistoryTurns = e.HistoryTurns,
                    QueuedMs = e.QueuedMs,
                    FirstTokenMs = e.FirstTokenMs,
                    TotalMs = e.TotalMs,
                };
            }
        }

        private void Dispatch(PolledEvent e)
        {
            NpcdLine line;
            if (!lines.TryGetValue(e.RequestId, out line)) return;
            switch (e.Kind)
            {
                case NativeMethods.EventStarted:
                    line.OnStarted();
                    break;
                case NativeMethods.EventTextDelta:
                    line.OnTextDelta(e.Text);
                    break;
                case NativeMethods.EventAction:
                    line.OnAction(new NpcdAction(e.ActionName, e.ActionArgsJson));
                    break;
                case NativeMethods.EventEmotion:
                    line.OnEmotion(e.Emotion);
                    break;
                case NativeMethods.EventSentence:
                    line.OnSentence(new NpcdSentence((int)e.SentenceIndex, e.Text));
                    break;
                case NativeMethods.EventDuplicate:
                    line.OnDuplicate(e.Text);  // not an end: the line goes on
                    break;
                case NativeMethods.EventFinished:
                    lines.Remove(line.Id);
                    line.OnEnded(new LineResult(line.Id, (FinishReason)e.FinishReason, e.Text,
                        null, (int)e.PromptTokens, (int)e.CompletionTokens, e.QueuedMs, e.FirstTokenMs, e.TotalMs,
                        e.Json,
                        e.ActionName.Length > 0 ? new NpcdAction(e.ActionName, e.ActionArgsJson) : null,
                        e.Emotion.Length > 0 ? e.Emotion : null, (int)e.CachedPromptTokens, (int)e.HistoryTurns));
                    break;
                case NativeMethods.EventError:
                    lines.Remove(line.Id);
                    var error = new NpcdError(e.ErrorCode, e.ErrorStatus, e.Text, e.RetryAfterMs);
                    line.OnEnded(new LineResult(line.Id, FinishReason.Unspecified, line.Text, error, 0, 0, 0, 0, 0));
                    break;
            }
        }
    }
}
