using System;
using System.Collections.Generic;

namespace Npcd
{
    /// <summary>A connection to the npcd daemon. Not thread-safe: use it from one thread (the
    /// game thread) and call Poll once per frame. Lines requested between two polls go out
    /// together as one Tick. It reconnects by itself when the daemon restarts; lines in flight
    /// at the disconnect fail with code 14 (UNAVAILABLE), and so do lines requested while it
    /// is not connected.</summary>
    public sealed class NpcdClient : IDisposable
    {
        private const int BatchSize = 64;

        private IntPtr handle;
        private readonly Dictionary<string, NpcdLine> lines = new Dictionary<string, NpcdLine>();
        private readonly NativeMethods.NativeEvent[] buffer = new NativeMethods.NativeEvent[BatchSize];

        /// <param name="address">"host:port" of the daemon, e.g. "127.0.0.1:50051".</param>
        /// <param name="initialBackoffMs">first wait between connection attempts; 0 = 250 ms</param>
        /// <param name="maxBackoffMs">the most the wait grows to (doubling); 0 = 5000 ms</param>
        public NpcdClient(string address, uint initialBackoffMs = 0, uint maxBackoffMs = 0)
        {
            if (string.IsNullOrEmpty(address)) throw new ArgumentException("address is empty", "address");
            handle = NativeMethods.npcd_client_new(NativeMethods.Utf8(address), initialBackoffMs, maxBackoffMs);
            if (handle == IntPtr.Zero) throw new ArgumentException("invalid address: " + address, "address");
        }

        public ConnectionState State
        {
            get { return (ConnectionState)NativeMethods.npcd_client_state(Live()); }
        }

        /// <summary>Lines requested and not ended yet.</summary>
        public int ActiveLines { get { return lines.Count; } }

        /// <summary>Requests a line; it goes out at the next Poll or Flush.</summary>
        public NpcdLine Say(LineRequest request)
        {
            if (request == null) throw new ArgumentNullException("request");
            Live();
            IntPtr native = RequestBuilder.Build(request);
            try
            {
                int status = NativeMethods.npcd_submit(handle, native);
                string id = NativeMethods.FromUtf8(NativeMethods.npcd_request_id(native));
                if (status == 2) throw new ArgumentException("request id " + id + " is already in use", "request");
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
            return NativeMethods.npcd_cancel(Live(), NativeMethods.Utf8(requestId)) == 0;
        }

        /// <summary>Sends the lines requested and cancels issued since the last Poll now.</summary>
        public void Flush()
        {
            NativeMethods.npcd_flush(Live());
        }

        /// <summary>Flushes, then raises the events that arrived since the last call, in
        /// order. Returns how many. If a handler throws, the remaining events are still
        /// delivered and the exceptions are rethrown together at the end.</summary>
        public int Poll()
        {
            Live();
            int total = 0;
            List<Exception> errors = null;
            int n;
            do
            {
                n = NativeMethods.npcd_poll(handle, buffer, BatchSize);
                for (int i = 0; i < n; i++)
                {
                    try
                    {
                        Dispatch(ref buffer[i]);
                    }
                    catch (Exception e)
                    {
                        if (errors == null) errors = new List<Exception>();
                        errors.Add(e);
                    }
                }
                total += n;
            } while (n == BatchSize);
            if (errors != null) throw new AggregateException("an npcd event handler threw", errors);
            return total;
        }

        /// <summary>Closes the connection. Active lines fail with code 1 (CANCELLED).</summary>
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

        private void Dispatch(ref NativeMethods.NativeEvent e)
        {
            NpcdLine line;
            if (!lines.TryGetValue(NativeMethods.FromUtf8(e.RequestId), out line)) return;
            switch (e.Kind)
            {
                case NativeMethods.EventStarted:
                    line.OnStarted();
                    break;
                case NativeMethods.EventTextDelta:
                    line.OnTextDelta(NativeMethods.FromUtf8(e.Text));
                    break;
                case NativeMethods.EventAction:
                    line.OnAction(new NpcdAction(NativeMethods.FromUtf8(e.ActionName), NativeMethods.FromUtf8(e.ActionArgsJson)));
                    break;
                case NativeMethods.EventEmotion:
                    line.OnEmotion(NativeMethods.FromUtf8(e.Emotion));
                    break;
                case NativeMethods.EventFinished:
                    lines.Remove(line.Id);
                    string actionName = NativeMethods.FromUtf8(e.ActionName);
                    string emotion = NativeMethods.FromUtf8(e.Emotion);
                    line.OnEnded(new LineResult(line.Id, (FinishReason)e.FinishReason, NativeMethods.FromUtf8(e.Text),
                        null, (int)e.PromptTokens, (int)e.CompletionTokens, e.QueuedMs, e.FirstTokenMs, e.TotalMs,
                        NativeMethods.FromUtf8(e.Json),
                        actionName.Length > 0 ? new NpcdAction(actionName, NativeMethods.FromUtf8(e.ActionArgsJson)) : null,
                        emotion.Length > 0 ? emotion : null));
                    break;
                case NativeMethods.EventError:
                    lines.Remove(line.Id);
                    var error = new NpcdError(e.ErrorCode, NativeMethods.FromUtf8(e.ErrorStatus), NativeMethods.FromUtf8(e.Text));
                    line.OnEnded(new LineResult(line.Id, FinishReason.Unspecified, line.Text, error, 0, 0, 0, 0, 0));
                    break;
            }
        }
    }
}
