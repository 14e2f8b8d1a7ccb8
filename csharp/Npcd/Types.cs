namespace Npcd
{
    /// <summary>NpcdClient.Say refused the request before sending anything: serialized, it is
    /// over MaxRequestBytes (NPCD_MAX_REQUEST_BYTES: gRPC's 4 MiB message limit less the Tick
    /// around it), which would end the whole session. The message names its size and the
    /// limit. Shorten the line, the history or the context. ParamName is "request" (or "blob" for
    /// ImportConversations).</summary>
    public sealed class RequestTooLargeException : System.ArgumentException
    {
        /// <summary>The most bytes one request may take serialized.</summary>
        public const int MaxRequestBytes = 4194304 - 16384;

        public RequestTooLargeException(string message, string paramName = "request") : base(message, paramName) { }
    }

    /// <summary>The numbers of npcd_connection_state.</summary>
    public enum ConnectionState
    {
        /// <summary>It was connected and lost the connection; reconnecting. Lines requested now fail (code 14).</summary>
        Disconnected = 0,
        /// <summary>Not connected yet since it was made. Lines requested now wait for the connection.</summary>
        Connecting = 1,
        Connected = 2,
    }

    /// <summary>The numbers of npcd.v1.Priority.</summary>
    public enum Priority
    {
        Ambient = 1,
        Player = 2,
    }

    /// <summary>The numbers of npcd.v1.Segmentation: which SentenceReady events a line raises.</summary>
    public enum Segmentation
    {
        /// <summary>None (the default).</summary>
        None = 0,
        /// <summary>One per sentence (. ! ? and their CJK, Arabic, Hindi kin).</summary>
        Sentence = 1,
        /// <summary>Also at clause marks (, ; : and kin): shorter pieces, an earlier first one.</summary>
        Clause = 2,
    }

    /// <summary>The numbers of npcd.v1.FinishReason.</summary>
    public enum FinishReason
    {
        Unspecified = 0,
        Stop = 1,
        Length = 2,
        Cancelled = 3,
        Deadline = 4,
        /// <summary>An ambient line ended early (its text so far) so that a player line could start.</summary>
        Preempted = 5,
    }

    /// <summary>Why a line failed: a gRPC status code, its name and a message.
    /// Code 14 (UNAVAILABLE): the daemon was unreachable or the connection dropped.
    /// Code 8 (RESOURCE_EXHAUSTED): the daemon's queue is full; RetryAfterMs says when to try again.
    /// Code 16 (UNAUTHENTICATED): the daemon refused the token (or its absence).</summary>
    public sealed class NpcdError
    {
        public readonly int Code;
        public readonly string Status;
        public readonly string Message;
        /// <summary>Code 8 (RESOURCE_EXHAUSTED): the daemon's estimate of when to retry, in ms; 0 otherwise.</summary>
        public readonly uint RetryAfterMs;

        public NpcdError(int code, string status, string message, uint retryAfterMs = 0)
        {
            Code = code;
            Status = status;
            Message = message;
            RetryAfterMs = retryAfterMs;
        }

        public override string ToString()
        {
            return Status + " (" + Code + "): " + Message;
        }
    }

    /// <summary>An action an NPC takes in a structured line: its name and its arguments, a
    /// JSON object ("{}" when it takes none). Parse ArgsJson with the game's JSON library.</summary>
    public sealed class NpcdAction
    {
        public readonly string Name;
        public readonly string ArgsJson;

        public NpcdAction(string name, string argsJson)
        {
            Name = name;
            ArgsJson = argsJson;
        }

        public override string ToString()
        {
            return Name + " " + ArgsJson;
        }
    }

    /// <summary>A complete sentence (or clause) of a line, for text-to-speech: the pieces, in
    /// Index order, add up to the line's Text exactly (a piece ends with the spaces after it).</summary>
    public sealed class NpcdSentence
    {
        /// <summary>0, 1, 2 ... within the line.</summary>
        public readonly int Index;
        public readonly string Text;

        public NpcdSentence(int index, string text)
        {
            Index = index;
            Text = text;
        }

        public override string ToString()
        {
            return Index + ": " + Text;
        }
    }

    /// <summary>The same numbers as npcd.v1.LoadStatus.</summary>
    public enum PersonaStatus
    {
        Unspecified = 0,
        /// <summary>Serving.</summary>
        Ready = 1,
        /// <summary>No good version could ever be loaded: Error says why.</summary>
        Error = 2,
        /// <summary>Its file's last edit is invalid; the last good version serves.</summary>
        Stale = 3,
        /// <summary>Its file was deleted; running lines finish.</summary>
        Retiring = 4,
    }

    /// <summary>A persona the daemon serves (NpcdClient.ListPersonas): what an editor's dropdown shows.
    /// MetadataJson is the persona's game-facing metadata (voice_id, emotion_tags, ...) as a JSON object,
    /// "{}" when it has none.</summary>
    public sealed class PersonaInfo
    {
        /// <summary>What LineRequest takes as its persona.</summary>
        public readonly string Id;
        public readonly string DisplayName;
        public readonly string Description;
        public readonly string MetadataJson;
        public readonly PersonaStatus Status;
        /// <summary>The last load error, naming file, line and field; "" when none.</summary>
        public readonly string Error;
        /// <summary>True when it runs with its own LoRA adapter, false on the base model.</summary>
        public readonly bool HasAdapter;

        public PersonaInfo(string id, string displayName, string description, string metadataJson,
                           PersonaStatus status, string error, bool hasAdapter)
        {
            Id = id;
            DisplayName = displayName;
            Description = description;
            MetadataJson = metadataJson;
            Status = status;
            Error = error;
            HasAdapter = hasAdapter;
        }

        public override string ToString()
        {
            return Id + " (" + DisplayName + ", " + Status + ")";
        }
    }

    /// <summary>What one NPC remembers: Turns, oldest first (prompts hold the newest that fit), and Summary, what
    /// the dropped turns said for a persona that summarises ("" otherwise).</summary>
    public sealed class ConversationTurns
    {
        public readonly Turn[] Turns;
        public readonly string Summary;

        public ConversationTurns(Turn[] turns, string summary)
        {
            Turns = turns;
            Summary = summary;
        }
    }

    /// <summary>A call that waits for the daemon (ListPersonas, the conversation calls) failed: it did not
    /// answer, or refused. Code is the gRPC status code (14 UNAVAILABLE when it is not running, 4
    /// DEADLINE_EXCEEDED, 16 UNAUTHENTICATED, 3 INVALID_ARGUMENT for a corrupt blob).</summary>
    public sealed class NpcdUnavailableException : System.Exception
    {
        public readonly int Code;

        public NpcdUnavailableException(int code, string message) : base(message)
        {
            Code = code;
        }
    }

    /// <summary>How a line ended. Error is null when it finished; then Reason says why.
    /// Structured lines: Text is the spoken line, Json the whole reply, Action and Emotion
    /// what it chose (null when it has none). Json is empty for a plain line.
    /// CachedPromptTokens: prompt tokens the daemon reused (the persona's prompt, the
    /// conversation so far); HistoryTurns: earlier turns the prompt held.</summary>
    public sealed class LineResult
    {
        public readonly string RequestId;
        public readonly FinishReason Reason;
        public readonly string Text;
        public readonly NpcdError Error;
        public readonly int PromptTokens;
        public readonly int CompletionTokens;
        public readonly float QueuedMs;
        public readonly float FirstTokenMs;
        public readonly float TotalMs;
        public readonly string Json;
        public readonly NpcdAction Action;
        public readonly string Emotion;
        public readonly int CachedPromptTokens;
        public readonly int HistoryTurns;

        internal LineResult(string requestId, FinishReason reason, string text, NpcdError error,
                            int promptTokens, int completionTokens, float queuedMs, float firstTokenMs,
                            float totalMs, string json = "", NpcdAction action = null, string emotion = null,
                            int cachedPromptTokens = 0, int historyTurns = 0)
        {
            RequestId = requestId;
            Reason = reason;
            Text = text;
            Error = error;
            PromptTokens = promptTokens;
            CompletionTokens = completionTokens;
            QueuedMs = queuedMs;
            FirstTokenMs = firstTokenMs;
            TotalMs = totalMs;
            Json = json ?? string.Empty;
            Action = action;
            Emotion = emotion;
            CachedPromptTokens = cachedPromptTokens;
            HistoryTurns = historyTurns;
        }

        public bool Failed { get { return Error != null; } }
    }
}
