namespace Npcd
{
    /// <summary>The numbers of npcd_connection_state.</summary>
    public enum ConnectionState
    {
        Disconnected = 0,
        Connecting = 1,
        Connected = 2,
    }

    /// <summary>The numbers of npcd.v1.Priority.</summary>
    public enum Priority
    {
        Ambient = 1,
        Player = 2,
    }

    /// <summary>The numbers of npcd.v1.FinishReason.</summary>
    public enum FinishReason
    {
        Unspecified = 0,
        Stop = 1,
        Length = 2,
        Cancelled = 3,
        Deadline = 4,
    }

    /// <summary>Why a line failed: a gRPC status code, its name and a message.
    /// Code 14 (UNAVAILABLE): the daemon was unreachable or the connection dropped.</summary>
    public sealed class NpcdError
    {
        public readonly int Code;
        public readonly string Status;
        public readonly string Message;

        public NpcdError(int code, string status, string message)
        {
            Code = code;
            Status = status;
            Message = message;
        }

        public override string ToString()
        {
            return Status + " (" + Code + "): " + Message;
        }
    }

    /// <summary>How a line ended. Error is null when it finished; then Reason says why.</summary>
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

        internal LineResult(string requestId, FinishReason reason, string text, NpcdError error,
                            int promptTokens, int completionTokens, float queuedMs, float firstTokenMs,
                            float totalMs)
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
        }

        public bool Failed { get { return Error != null; } }
    }
}
