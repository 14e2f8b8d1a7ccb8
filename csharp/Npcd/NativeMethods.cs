using System;
using System.Runtime.InteropServices;
using System.Text;

namespace Npcd
{
    /// <summary>P/Invoke declarations of the C ABI in npcd_client.h. Strings go in as
    /// NUL-terminated UTF-8 byte arrays, never through the platform's string marshaling.</summary>
    internal static class NativeMethods
    {
        // libnpcd_client.so / libnpcd_client.dylib / npcd_client.dll
        private const string Lib = "npcd_client";

        // npcd_event field for field: the same order and types, so the same offsets (new
        // fields are only ever appended to the C struct, and so here).
        [StructLayout(LayoutKind.Sequential)]
        internal struct NativeEvent
        {
            public IntPtr RequestId;
            public IntPtr Text;
            public IntPtr ErrorStatus;
            public int Kind;
            public int FinishReason;
            public int ErrorCode;
            public uint QueuePosition;
            public uint PromptTokens;
            public uint CompletionTokens;
            public float QueuedMs;
            public float FirstTokenMs;
            public float TotalMs;
            public IntPtr Json;
            public IntPtr ActionName;
            public IntPtr ActionArgsJson;
            public IntPtr Emotion;
        }

        // npcd_event_kind
        internal const int EventStarted = 1;
        internal const int EventTextDelta = 2;
        internal const int EventFinished = 3;
        internal const int EventError = 4;
        internal const int EventAction = 5;
        internal const int EventEmotion = 6;

        [DllImport(Lib)] internal static extern IntPtr npcd_client_new(byte[] address, uint initialBackoffMs, uint maxBackoffMs);
        [DllImport(Lib)] internal static extern void npcd_client_free(IntPtr client);
        [DllImport(Lib)] internal static extern int npcd_client_state(IntPtr client);

        [DllImport(Lib)] internal static extern IntPtr npcd_request_new(byte[] persona, byte[] line);
        [DllImport(Lib)] internal static extern void npcd_request_free(IntPtr request);
        [DllImport(Lib)] internal static extern IntPtr npcd_request_id(IntPtr request);
        [DllImport(Lib)] internal static extern int npcd_request_set_id(IntPtr request, byte[] requestId);
        [DllImport(Lib)] internal static extern int npcd_request_set_npc_id(IntPtr request, byte[] npcId);
        [DllImport(Lib)] internal static extern int npcd_request_set_speaker(IntPtr request, byte[] speaker);
        [DllImport(Lib)] internal static extern int npcd_request_add_history(IntPtr request, byte[] speaker, byte[] text);
        [DllImport(Lib)] internal static extern int npcd_request_set_context(IntPtr request, byte[] key, byte[] value);
        [DllImport(Lib)] internal static extern int npcd_request_set_priority(IntPtr request, int priority);
        [DllImport(Lib)] internal static extern int npcd_request_set_deadline_ms(IntPtr request, uint deadlineMs);
        [DllImport(Lib)] internal static extern int npcd_request_set_max_tokens(IntPtr request, uint maxTokens);
        [DllImport(Lib)] internal static extern int npcd_request_set_temperature(IntPtr request, float temperature);
        [DllImport(Lib)] internal static extern int npcd_request_set_top_p(IntPtr request, float topP);
        [DllImport(Lib)] internal static extern int npcd_request_set_top_k(IntPtr request, uint topK);
        [DllImport(Lib)] internal static extern int npcd_request_set_repetition_penalty(IntPtr request, float penalty);
        [DllImport(Lib)] internal static extern int npcd_request_set_seed(IntPtr request, ulong seed);
        [DllImport(Lib)] internal static extern int npcd_request_add_stop(IntPtr request, byte[] stop);
        [DllImport(Lib)] internal static extern int npcd_request_set_structured(IntPtr request, int on);
        /// <summary>description and argsSchemaJson may be null (passed as NULL).</summary>
        [DllImport(Lib)] internal static extern int npcd_request_add_action(IntPtr request, byte[] name, byte[] description, byte[] argsSchemaJson);
        [DllImport(Lib)] internal static extern int npcd_request_set_response_format(IntPtr request, byte[] schemaJson);

        [DllImport(Lib)] internal static extern int npcd_submit(IntPtr client, IntPtr request);
        [DllImport(Lib)] internal static extern int npcd_cancel(IntPtr client, byte[] requestId);
        [DllImport(Lib)] internal static extern void npcd_flush(IntPtr client);
        [DllImport(Lib)] internal static extern int npcd_poll(IntPtr client, [Out] NativeEvent[] events, int max);

        internal static byte[] Utf8(string s)
        {
            if (s == null) throw new ArgumentNullException();
            var bytes = new byte[Encoding.UTF8.GetByteCount(s) + 1];
            Encoding.UTF8.GetBytes(s, 0, s.Length, bytes, 0);
            return bytes;
        }

        /// <summary>Utf8, with null passed on as NULL.</summary>
        internal static byte[] Utf8OrNull(string s)
        {
            return s == null ? null : Utf8(s);
        }

        internal static string FromUtf8(IntPtr p)
        {
            if (p == IntPtr.Zero) return string.Empty;
            int n = 0;
            while (Marshal.ReadByte(p, n) != 0) n++;
            var bytes = new byte[n];
            Marshal.Copy(p, bytes, 0, n);
            return Encoding.UTF8.GetString(bytes);
        }
    }
}
